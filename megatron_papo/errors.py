"""The user's mistakes, and the one way the entry points report them.

Every error type a user can fix by changing a file, a path, a flag or a config field derives from
:class:`UserError` as well as from its usual builtin (``ConfigError(ValueError, UserError)``,
``DataError``, ``CheckpointError``, ``HFCheckpointError``, ``UnsupportedArchitectureError``,
``MissingDependencyError``, ``MetricsFileError``). The entry points (``train``, ``evaluate``,
``selfcheck``, ``tools/*.py``) run their body under :func:`exit_on_user_error`: such an error
prints ``error: <message>`` once and the process exits 2; any other exception keeps its
traceback (it is a bug, or a fault the user cannot fix by editing their input).

Once per job: under torchrun every rank usually meets the same mistake (the config and the data
are read on every rank). The first rank of a node that reports creates a marker file named after
the job (launcher pid, ``TORCHELASTIC_RUN_ID``, restart count, master port) with ``O_EXCL``; the other
ranks of that node stay silent and exit 2 too. A single process always prints.

Floor 0: imports nothing of the package.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["USER_ERROR_EXIT", "UserError", "exit_on_user_error", "report_user_error"]

USER_ERROR_EXIT = 2
"""Exit status of a run stopped by a user error (argparse's for a wrong flag, too)."""

F = TypeVar("F", bound=Callable[..., int])


class UserError(Exception):
    """A mistake in the user's input (config, data, checkpoint path, model folder, missing extra):
    the message names the file / field and what was expected; reported as one line, exit 2."""


def _job_key() -> str | None:
    """An id shared by the ranks of one launched job, or None for a single plain process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    # the local ranks of a node share their launcher (torchrun's agent) as parent process; the
    # run id and restart count tell launches with a recycled pid apart
    names = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "MASTER_PORT")
    run = ":".join([*(os.environ.get(n, "") for n in names), str(os.getppid())])
    return hashlib.sha1(run.encode()).hexdigest()[:16]


def _first_on_this_node(key: str) -> bool:
    path = os.path.join(tempfile.gettempdir(), f"megatron_papo_error_{key}")
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:  # no writable temp dir: better a line per rank than none
        return True
    return True


def report_user_error(error: BaseException | str, stream: Any = None) -> int:
    """Print ``error: <message>`` (once per job and node) and return :data:`USER_ERROR_EXIT`."""
    key = _job_key()
    if key is None or _first_on_this_node(key):
        print(f"error: {error}", file=stream or sys.stderr, flush=True)
    return USER_ERROR_EXIT


def exit_on_user_error(main: F) -> F:
    """Wrap an entry point's ``main``: a :class:`UserError` becomes one line and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            return report_user_error(e)

    return wrapper  # type: ignore[return-value]
