"""cli.py: the one entry point of every PTR-torch script (a leaf: imports nothing from the project).

Expected failures (bad data, a bad checkpoint, a missing file or serial port, non-finite losses, Ctrl-C) end
a script with ONE line naming the culprit and a non-zero exit status, never a traceback. Set PTR_TRACEBACK=1
to see the traceback anyway (for a bug report).

    if __name__ == "__main__":
        run_cli(main)
"""

import os
import sys


class ExpectedError(Exception):
    """Mixin for errors that a user causes and can fix (a file, a field, a flag): reported in one line."""


# What a user can cause and fix. OSError covers missing files and pyserial's SerialException.
EXPECTED = (ExpectedError, ValueError, OSError, FloatingPointError)
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def one_line(e):
    """The message of an exception on one line (pyserial and OSError put the path in their own text)."""
    return " ".join(str(e).split()) or type(e).__name__


def run_cli(main, argv=None):
    """Run main(argv); an expected failure prints `<script>: error: <message>` and exits 2, Ctrl-C exits 130."""
    script = os.path.basename(sys.argv[0]) or "ptr"
    try:
        status = main(argv) if argv is not None else main()
    except KeyboardInterrupt:
        if os.environ.get("PTR_TRACEBACK"):
            raise
        print(f"{script}: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except EXPECTED as e:
        if os.environ.get("PTR_TRACEBACK"):
            raise
        print(f"{script}: error: {one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    sys.exit(status if isinstance(status, int) else 0)
