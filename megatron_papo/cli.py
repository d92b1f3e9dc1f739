"""Command-line parsing shared by the entry points: `--config PATH`, flags, and key=value overrides.

    python -m megatron_papo.train --config examples/tiny_papo_g.yaml parallel.tp=2 --resume

Each entry point describes itself as a :class:`Command` (what it does, its flags); ``--help``
prints that and the config tree (every field's type, default and docstring) and exits 0; a wrong
flag exits 2 with the usage. Returns the built, validated config; nothing argparse-shaped travels
into the library.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NoReturn, TextIO

from megatron_papo.config import ConfigError, PapoConfig, describe_config, load_config


@dataclass(frozen=True)
class Flag:
    """One command-line flag of an entry point."""

    name: str
    """The flag as typed, e.g. ``--resume``."""
    help: str
    """One line: what it does."""
    metavar: str | None = None
    """Name of its value (``DIR``); None = a switch that takes no value."""


@dataclass(frozen=True)
class Command:
    """An entry point: its invocation, a paragraph of what it does, and its flags."""

    prog: str
    """How it is run, e.g. ``python -m megatron_papo.train``."""
    summary: str
    """What the command does (printed under the usage line)."""
    flags: tuple[Flag, ...] = ()
    """Flags besides ``--config`` and ``--help``."""

    def usage(self) -> str:
        parts = [f"[{f.name}{' ' + f.metavar if f.metavar else ''}]" for f in self.flags]
        return " ".join(["usage:", self.prog, "--config PATH", *parts, "[section.key=value ...]"])

    def help(self) -> str:
        rows = [("--config PATH", "YAML config file (examples/*.yaml); without it, the defaults below"),
                ("section.key=value", "override any config field (repeatable); e.g. loss.gamma=0.01"),
                *((f"{f.name}{' ' + f.metavar if f.metavar else ''}", f.help) for f in self.flags),
                ("-h, --help", "print this help and exit")]
        width = max(len(r[0]) for r in rows) + 2
        flags = "\n".join(f"  {name:<{width}}{text}" for name, text in rows)
        return f"{self.usage()}\n\n{self.summary}\n\narguments:\n{flags}\n\n{describe_config()}\n"


DEFAULT_COMMAND = Command(prog="python -m megatron_papo.{train,evaluate}",
                          summary="A megatron_papo entry point.",
                          flags=(Flag("--resume", "continue from the newest checkpoint"),))


# Switches that set config fields (the config tree stays the one source the library reads).
_FLAG_FIELDS: dict[str, tuple[str, ...]] = {
    "--resume": ("resume",),
    "--resume-or-start": ("resume", "resume_or_start"),
    "--resume-allow-changes": ("resume", "resume_allow_changes"),
}


@dataclass
class CliArgs:
    config: PapoConfig
    config_path: str | None
    overrides: list[str]
    flags: dict[str, str | bool] = field(default_factory=dict)


def parse_cli(argv: Sequence[str], command: Command = DEFAULT_COMMAND, *,
              stdout: TextIO | None = None) -> CliArgs:
    """Parse argv for ``command``. ``--help`` prints ``command.help()`` and exits 0; a switch flag
    maps to True, a flag with a metavar takes one value (``--flag V`` or ``--flag=V``); ``--resume``,
    ``--resume-or-start`` and ``--resume-allow-changes`` also set their checkpoint.* fields. Raises
    ConfigError (naming the flag and the usage) otherwise."""
    switches = {f.name for f in command.flags if f.metavar is None}
    valued = {f.name for f in command.flags if f.metavar is not None}
    path, overrides, flags = None, [], {}
    it = iter(argv)
    for arg in it:
        if arg in ("-h", "--help"):
            print(command.help(), file=stdout or sys.stdout, end="")
            raise SystemExit(0)
        name, eq, value = arg.partition("=")
        if name == "--config":
            path = value if eq else next(it, None)
            if not path:
                raise ConfigError(f"--config needs a path\n{command.usage()}")
        elif arg in switches:
            flags[arg] = True
        elif name in valued:
            flags[name] = value if eq else next(it, "")
            if not flags[name]:
                raise ConfigError(f"{name} needs a value\n{command.usage()}")
        elif arg.startswith("-") and "=" not in arg:
            raise ConfigError(f"unknown flag {arg}\n{command.usage()}")
        else:
            overrides.append(arg)
    for flag, fields in _FLAG_FIELDS.items():
        if flags.get(flag):
            overrides += [f"checkpoint.{f}=true" for f in fields]
    return CliArgs(config=load_config(path, overrides), config_path=path, overrides=overrides, flags=flags)


def exit_with_error(message: str, code: int = 2) -> NoReturn:
    """``error: <message>`` on stderr, then exit with ``code`` (2: the user can fix it)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def helper_module_main(doc: str | None, argv: Sequence[str] | None = None) -> int:
    """``__main__`` of a module that is imported, not run (tools/_*.py): ``--help`` prints its
    docstring and exits 0; anything else says it is not a command and exits 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args in ([], ["-h"], ["--help"]):
        print((doc or "").strip())
        return 0
    print(f"error: this module is imported by the tools, not run; arguments {args} are not understood",
          file=sys.stderr)
    return 2
