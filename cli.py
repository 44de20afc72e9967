"""cli.py: the one entry point of every PTR-torch script (a leaf: imports nothing from the project).

Expected failures (bad data, a bad checkpoint, a missing file or serial port, non-finite losses,
Ctrl-C) end a script with ONE line naming the culprit and a non-zero exit status, never a traceback.
Set PTR_TRACEBACK=1 to see the traceback anyway (for a bug report).

    if __name__ == "__main__":
        run_cli(main)

add_dataclass_args() turns a config dataclass into command-line flags, one per field, with the
field's default and its trailing comment as the help text, so a default is written once (in the
dataclass); a field no flag can give (a dict, say) is an error when the parser is built, never a
flag silently missing. check_flags() refuses a value out of its range (a batch of 0, a mix of 1.5)
in one line naming the flag, before a script does any work.
"""

import argparse
import collections.abc
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
    """{field: its trailing comment} from a dataclass's source (on the field's own lines); {} when
    the source cannot be found (a class made at run time, a module loaded from a file path and not
    registered): the flags are the same, their help shows the defaults alone."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
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


SCALARS = (int, float, str)  # the field types a flag's text converts to


def _parse_type(hint, literal=False):
    """argparse `type` for a scalar annotation; `X | None` also accepts the word none, unless
    literal (a `str | None` whose text is always the value: None is the flag left out). None for a
    type no flag can give."""
    if hint in SCALARS:
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    if not (optional and len(args) == 1 and args[0] in SCALARS):
        return None
    if literal:
        return args[0]

    def parse(text):
        return None if text.lower() == "none" else args[0](text)

    parse.__name__ = args[0].__name__  # argparse names the type in its error message
    return parse


def _item_type(hint):
    """The item type of a list annotation (list, list[X], tuple[X, ...], Sequence[X]; X a scalar,
    str when not named), or None for any other annotation."""
    origin = typing.get_origin(hint) or hint
    if origin not in (list, tuple, collections.abc.Sequence):
        return None
    args = [a for a in typing.get_args(hint) if a is not Ellipsis]
    if len(args) > 1 or (args and args[0] not in SCALARS):
        return None
    return args[0] if args else str


def _field_default(f, defaults):
    if f.name in defaults:
        return defaults[f.name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _shown(default, default_help):
    """What a flag's help says of its default."""
    if default is dataclasses.MISSING:
        return "required"
    if default_help:
        return f"default: {default_help}"
    if isinstance(default, (list, tuple)):
        return "default: " + (" ".join(map(str, default)) or "none")
    return f"default: {default}"


def add_dataclass_args(
    parser,
    cls,
    skip=(),
    choices=None,
    defaults=None,
    default_help=None,
    nargs=None,
    switches=(),
    literal=(),
):
    """One flag --<field> per field of dataclass cls (fields in skip excepted): type from the
    annotation, default from the dataclass (or `defaults`, a phase's own), help from the field's
    trailing comment; a field without a default is a required flag. bools get --<field> /
    --no-<field>, or --<field> alone for those in switches; list fields (list, list[X],
    tuple[X, ...], Sequence[X]) take any number of values (--<field> a b c), or nargs[field]
    (argparse.REMAINDER: the rest of the line, flags included); a `str | None` field in literal
    takes its text as it is, the word none too (a file or task may be called that), its None being
    the flag left out (its help: the comment alone). choices: {field: allowed values};
    default_help: what the help says instead of the default's value. A field of any other type is
    a TypeError naming it, here, when the parser is built. Returns the field names added."""
    comments = field_comments(cls)
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        default = _field_default(f, defaults)
        switch = hint is bool and f.name in switches
        if switch and default is not False:
            raise TypeError(f"{cls.__name__}.{f.name}: a switch must default to False")
        if f.name in literal and set(typing.get_args(hint)) != {str, type(None)}:
            raise TypeError(f"{cls.__name__}.{f.name}: only a `str | None` field can be literal")
        if hint is bool:
            kind = dict(action="store_true" if switch else argparse.BooleanOptionalAction)
        elif _item_type(hint) is not None:
            kind = dict(type=_item_type(hint), nargs=(nargs or {}).get(f.name, "*"))
        elif _parse_type(hint) is not None:
            parse = _parse_type(hint, literal=f.name in literal)
            kind = dict(type=parse, choices=(choices or {}).get(f.name))
        else:
            raise TypeError(
                f"{cls.__name__}.{f.name}: no flag can give a {hint!r} field (skip it, or give it "
                f"a bool, int, float, str, `X | None` or list type)"
            )
        help_text = comments.get(f.name, "")
        # no default to show: a switch is off unless given; a literal field's None is the flag
        # left out, which its comment says in words
        if not switch and not (f.name in literal and default is None):
            shown = _shown(default, default_help)
            help_text = f"{help_text} ({shown})" if help_text else shown
        kind["help"] = help_text.replace("%", "%%")  # argparse formats help with %
        if default is dataclasses.MISSING:
            kind["required"] = True
        else:
            kind["default"] = default
        parser.add_argument(f"--{f.name}", **kind)
        added.append(f.name)
    return added


def dataclass_from_args(cls, args, **given):
    """cls built from the parsed flags add_dataclass_args added, plus the fields given here."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in given]
    return cls(**{name: getattr(args, name) for name in names if hasattr(args, name)}, **given)
