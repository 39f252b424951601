"""The manual page ganeti-kvm(1), generated from the command's argparse parser.

Every command, option, argument and help text comes from
:func:`ganeti_kvm.tools.cli.build_parser`, so the page cannot drift from the
command; the Debian package builds it at build time::

    python3 -m ganeti_kvm.tools.manpage [-o FILE] [--package-dir DIR]

The page's date is ``$SOURCE_DATE_EPOCH`` (set by dpkg-buildpackage from
debian/changelog, for reproducible builds), else empty.  The output depends
on nothing else: no terminal width, no locale, no clock.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Iterable, Sequence

from ganeti_kvm import __version__
from ganeti_kvm.core import names as c

# Where the Debian package installs the library (the FILES section names the
# hook and the wrapper there; constants.py locates them next to the package).
DEBIAN_PACKAGE_DIR = "/usr/lib/python3/dist-packages/ganeti_kvm"
SECTION = "1"

EXIT_STATUS = (
    ("0", "success"),
    ("1", "an error, reported as one line on standard error "
          "(with \\fB\\-\\-debug\\fR, also its traceback)"),
    ("2", "a usage error (unknown command or option, missing argument)"),
    ("130", "interrupted"),
)


# --- roff ------------------------------------------------------------------------


def escape(text: str) -> str:
    """``text`` as roff prose: backslashes and hyphens escaped, one line."""
    text = " ".join(text.split())
    return text.replace("\\", "\\e").replace("-", "\\-")


def _line(text: str) -> str:
    """A roff text line: a leading ``.`` or ``'`` would be read as a request."""
    return "\\&" + text if text[:1] in (".", "'") else text


def bold(text: str) -> str:
    return f"\\fB{escape(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{escape(text)}\\fR"


# --- reading the parser ---------------------------------------------------------------


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The action's help text with ``%(default)s`` and the like expanded."""
    text = action.help or ""
    if "%" in text:
        params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
        params["prog"] = parser.prog
        text = text % params
    return text


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices.items())
    return []


def _value(action: argparse.Action) -> str:
    """How an argument's value is shown: its metavar, its choices, or its name."""
    if action.metavar is not None:
        return str(action.metavar)
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        return "{" + ",".join(str(choice) for choice in action.choices) + "}"
    return action.dest.upper() if action.option_strings else action.dest


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _flag(action: argparse.Action) -> str:
    """The long option (the one the page shows in synopses)."""
    return max(action.option_strings, key=len)


def _synopsis_item(action: argparse.Action) -> str:
    if isinstance(action, argparse._SubParsersAction):
        return f"{italic(_value(action))} ..."
    if not action.option_strings:
        return italic(_value(action))
    item = bold(_flag(action))
    if _takes_value(action):
        item += " " + italic(_value(action))
    return item if action.required else f"[{item}]"


def _shown(actions: Iterable[argparse.Action], skip: frozenset[str]) -> list[argparse.Action]:
    """The actions a section shows: not help, not the global options again."""
    return [a for a in actions
            if not isinstance(a, argparse._HelpAction)
            and not (a.option_strings and set(a.option_strings) <= skip)]


def _synopsis(prog: str, parser: argparse.ArgumentParser, skip: frozenset[str]) -> str:
    actions = _shown(parser._actions, skip)
    optionals = [a for a in actions if a.option_strings]
    positionals = [a for a in actions if not a.option_strings]
    return " ".join([bold(prog)] + [_synopsis_item(a) for a in optionals + positionals])


def _describe(parser: argparse.ArgumentParser, actions: Sequence[argparse.Action]) -> list[str]:
    """A ``.TP`` paragraph per action: its options and value, then its help."""
    out: list[str] = []
    for action in actions:
        if isinstance(action, argparse._SubParsersAction):
            continue  # the COMMANDS section
        if not action.option_strings and not action.help and action.choices is None:
            continue  # a plain argument: the synopsis shows it
        if action.option_strings:
            names = ", ".join(bold(name) for name in action.option_strings)
            if _takes_value(action) and not isinstance(action, argparse._VersionAction):
                names += " " + italic(_value(action))
        else:
            names = italic(_value(action))
        out += [".TP", names]
        text = _help(parser, action)
        if isinstance(action, argparse._VersionAction):
            text = text or "show the program's version and exit"
        if text:
            out.append(_line(escape(text)))
    return out


# --- the page -----------------------------------------------------------------------


def _date(source_date_epoch: str | None) -> str:
    if not source_date_epoch:
        return ""
    stamp = datetime.datetime.fromtimestamp(int(source_date_epoch), tz=datetime.UTC)
    return stamp.strftime("%Y-%m-%d")


def render(parser: argparse.ArgumentParser, date: str = "",
           package_dir: str = DEBIAN_PACKAGE_DIR, version: str = __version__) -> str:
    """The roff source of the manual page of ``parser``'s command."""
    prog = parser.prog
    summary = (parser.description or prog).rstrip(".")
    summary = summary[:1].lower() + summary[1:]
    top_flags = frozenset(s for a in parser._actions for s in a.option_strings)
    # The options every command accepts (argparse parents) are shown once, at the top.
    global_flags = frozenset(s for a in parser._actions for s in a.option_strings
                             if not isinstance(a, (argparse._HelpAction,
                                                   argparse._VersionAction)))
    commands = _subcommands(parser)
    page = [
        f'.TH "{prog.upper()}" "{SECTION}" "{date}" "{prog} {version}" "User Commands"',
        ".SH NAME",
        f"{escape(prog)} \\- {escape(summary)}",
        ".SH SYNOPSIS",
        _synopsis(prog, parser, frozenset()),
        ".SH DESCRIPTION",
        _line(escape(parser.description or "")),
        ".PP",
        _line(escape(f"The options {', '.join(sorted(global_flags))} may also be given after "
                     "the command. Each command prints its own usage with --help.")),
        ".SH OPTIONS",
        *_describe(parser, _shown(parser._actions, frozenset()) +
                   [a for a in parser._actions if isinstance(a, argparse._HelpAction)]),
    ]
    if commands:
        page.append(".SH COMMANDS")
    for name, sub in commands:
        page += [
            f'.SS "{escape(name)}"',
            _synopsis(f"{prog} {name}", sub, top_flags),
            ".PP",
            _line(escape(sub.description or "")),
        ]
        actions = _shown(sub._actions, top_flags)
        if actions:
            page += [".PP", *_describe(sub, actions)]
    page += [
        ".SH EXIT STATUS",
    ]
    for status, meaning in EXIT_STATUS:
        page += [".TP", bold(status), meaning]
    page += [
        ".SH ENVIRONMENT",
        ".TP",
        bold(c.RUN_DIR_ENV),
        escape(f"The node's run directory when --run-dir is not given (default "
               f"{c.DEFAULT_RUN_DIR})."),
        ".SH FILES",
        ".TP",
        italic(c.DEFAULT_RUN_DIR),
        escape("The runtime state of the instances: control sockets, runtime records, logs."),
        ".TP",
        italic(f"{package_dir}/tools/{os.path.basename(c.KVM_IFUP)}"),
        escape("The hook that connects each NIC's TAP device to the node's network."),
        ".TP",
        italic(f"{package_dir}/tools/{os.path.basename(c.KVM_CONSOLE_WRAPPER)}"),
        escape("The console wrapper that ssh runs to attach to a serial console."),
        ".SH SEE ALSO",
        f"{bold('gnt-instance')}(8), {bold('qemu-system-x86_64')}(1), "
        f"{bold('dpkg-divert')}(1)",
    ]
    return "\n".join(page) + "\n"


def build() -> str:
    """The page of ``ganeti-kvm`` as the Debian package installs it."""
    from ganeti_kvm.tools import cli

    return render(cli.build_parser(), date=_date(os.environ.get("SOURCE_DATE_EPOCH")))


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m ganeti_kvm.tools.manpage [-o FILE] [--package-dir DIR]``."""
    from ganeti_kvm.tools import cli

    parser = argparse.ArgumentParser(prog="python3 -m ganeti_kvm.tools.manpage",
                                     description="Write the manual page ganeti-kvm(1).")
    parser.add_argument("-o", "--output", metavar="FILE", default=None,
                        help="write it to FILE (default: standard output)")
    parser.add_argument("--package-dir", metavar="DIR", default=DEBIAN_PACKAGE_DIR,
                        help=f"where the library is installed (default {DEBIAN_PACKAGE_DIR})")
    args = parser.parse_args(argv)
    text = render(cli.build_parser(), date=_date(os.environ.get("SOURCE_DATE_EPOCH")),
                  package_dir=args.package_dir)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as err:
        print(f"manpage: cannot write {args.output}: {err.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
