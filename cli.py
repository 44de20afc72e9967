"""cli.py: the one entry point of every PTR-torch script (a leaf: imports nothing from the project).

Expected failures (bad data, a bad checkpoint, a missing file or serial port, non-finite losses,
Ctrl-C) end a script with ONE line naming the culprit and a non-zero exit status, never a traceback.
Set PTR_TRACEBACK=1 to see the traceback anyway (for a bug report).

    if __name__ == "__main__":
        run_cli(main)

add_dataclass_args() turns a config dataclass into command-line flags, one per field, with the
field's default and its trailing comment as the help text, so a default is written once (in the
dataclass). check_flags() refuses a value out of its range (a batch of 0, a mix of 1.5) in one line
naming the flag, before a script does any work.
"""

import argparse
import dataclasses
import inspect
import io
import os
import sys
import tokenize
import types
import typing


class ExpectedError(Exception):
    """Mixin for errors that a user causes and can fix (a file, a field, a flag):
    reported in one line."""


class MissingPackageError(ExpectedError, ImportError):
    """An optional package a command needs (pyserial, opencv, Interbotix's API, a format reader's)
    is not installed; the message names it, and the pip command where there is one."""


# What a user can cause and fix. OSError covers missing files and pyserial's SerialException.
EXPECTED = (ExpectedError, ValueError, OSError, FloatingPointError)
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
# Rules for check_flags: (the test a value must pass, what the error says is expected).
POSITIVE = (lambda value: value > 0, "a positive integer")
FRACTION = (lambda value: 0 <= value <= 1, "a fraction in [0, 1]")  # NaN fails it too


class FlagError(ExpectedError, ValueError):
    """A command-line value the script cannot use: `--<flag> <value>: expected <what>`."""


def check_flags(args, rules):
    """Refuse the first flag whose value breaks its rule, right after parsing, so that nothing is
    opened or written first. rules: {"--flag": (test, what is expected)}; the value is
    args.<flag>."""
    for flag, (test, expected) in rules.items():
        value = getattr(args, flag.removeprefix("--"))
        if not test(value):
            raise FlagError(f"{flag} {value}: expected {expected}")


def one_line(e):
    """The message of an exception on one line (pyserial and OSError put the path
    in their own text)."""
    return " ".join(str(e).split()) or type(e).__name__


def run_cli(main, argv=None):
    """Run main(argv); an expected failure prints `<script>: error: <message>` and
    exits 2, Ctrl-C exits 130."""
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


def field_comments(cls):
    """{field: its trailing comment} from a dataclass's source (on the field's own lines)."""
    source = inspect.getsource(cls)
    comments = {}
    field, indent, expect_colon = None, None, False
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.INDENT and indent is None:
            indent = len(tok.string)
        elif tok.type == tokenize.NAME and tok.start[1] == indent and field is None:
            field, expect_colon = tok.string, True
        elif expect_colon:
            expect_colon = False
            if tok.string != ":":  # not an annotated field (a def, a docstring...)
                field = None
        elif tok.type == tokenize.COMMENT and field is not None:
            text = tok.string.lstrip("#").strip()
            comments[field] = f"{comments[field]} {text}" if field in comments else text
        elif tok.type == tokenize.NEWLINE:
            field = None
    return comments


def _parse_type(hint):
    """argparse `type` for a field's annotation; `X | None` also accepts the word none."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    if not optional:
        return hint

    def parse(text):
        return None if text.lower() == "none" else args[0](text)

    parse.__name__ = args[0].__name__  # argparse names the type in its error message
    return parse


def add_dataclass_args(parser, cls, skip=(), choices=None, defaults=None, default_help=None):
    """One flag --<field> per field of dataclass cls (fields in skip excepted): type from the
    annotation, default from the dataclass (or `defaults`, a phase's own), help from the field's
    trailing comment; bools get --<field> / --no-<field>. choices: {field: allowed values};
    default_help: what the help says instead of the default's value. Returns the field names
    added."""
    comments = field_comments(cls)
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = defaults.get(f.name, f.default)
        shown = f"default: {default_help or default}"
        text = comments.get(f.name, "")
        help_text = f"{text} ({shown})" if text else shown
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        if hints[f.name] is bool:
            parser.add_argument(
                f"--{f.name}",
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text,
            )
        else:
            parser.add_argument(
                f"--{f.name}",
                type=_parse_type(hints[f.name]),
                default=default,
                choices=(choices or {}).get(f.name),
                help=help_text,
            )
        added.append(f.name)
    return added


def dataclass_from_args(cls, args, **given):
    """cls built from the parsed flags add_dataclass_args added, plus the fields given here."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in given]
    return cls(**{name: getattr(args, name) for name in names if hasattr(args, name)}, **given)
