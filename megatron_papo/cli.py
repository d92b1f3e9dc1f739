"""Command-line parsing shared by the entry points: `--config PATH`, flags, and key=value overrides.

    python -m megatron_papo.train --config examples/tiny_papo_g.yaml parallel.tp=2 --resume

Returns the built, validated config; nothing argparse-shaped travels into the library.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from megatron_papo.config import ConfigError, PapoConfig, load_config

USAGE = ("usage: python -m megatron_papo.{train,evaluate} --config PATH [--resume] [--checkpoint DIR] "
         "[--save-init DIR] [section.key=value ...]")


@dataclass
class CliArgs:
    config: PapoConfig
    config_path: str | None
    overrides: list[str]
    flags: dict[str, str | bool] = field(default_factory=dict)


def parse_cli(argv: Sequence[str], *, bool_flags: Sequence[str] = ("--resume",),
              extra_flags: Sequence[str] = ()) -> CliArgs:
    """Parse argv; `--resume` sets checkpoint.resume=true; `extra_flags` take one value each."""
    path, overrides, flags = None, [], {}
    it = iter(argv)
    for arg in it:
        if arg in ("-h", "--help"):
            raise SystemExit(USAGE)
        name, eq, value = arg.partition("=")
        if name == "--config":
            path = value if eq else next(it, None)
            if not path:
                raise ConfigError("--config needs a path")
        elif arg in bool_flags:
            flags[arg] = True
        elif name in extra_flags:
            flags[name] = value if eq else next(it, "")
            if not flags[name]:
                raise ConfigError(f"{name} needs a value")
        elif arg.startswith("--") and "=" not in arg:
            raise ConfigError(f"unknown flag {arg}; {USAGE}")
        else:
            overrides.append(arg)
    if flags.get("--resume"):
        overrides.append("checkpoint.resume=true")
    return CliArgs(config=load_config(path, overrides), config_path=path, overrides=overrides, flags=flags)
