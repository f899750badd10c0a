"""Bytewax recovery stores: create one when missing, bind it to the flow definition that fills it.

A recovery store is a directory of SQLite partitions (``part-N.sqlite3``)
that ``python -m bytewax.run ... -r DIR -s SNAPSHOT_S -b BACKUP_S`` snapshots
state and input offsets into; after a crash the flow resumes at the last
snapshot. ``ensure_store`` creates the store the first time (what
``python -m bytewax.recovery DIR N`` does). ``bind_definition`` records the
settings that shape a flow's state (window length, lateness, ...) next to the
store and refuses, with a ``ConfigError`` that names the settings and the fix,
to resume a store that a different definition wrote: old window state would
otherwise be misread.

One store per flow: two flows never share a directory.

Example::

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()) / "store"
    >>> ensure_store(d)
    True
    >>> bind_definition(d, "telemetry", {"IOTFLOW_WINDOW_S": 10.0})
    >>> bind_definition(d, "telemetry", {"IOTFLOW_WINDOW_S": 20.0})
    Traceback (most recent call last):
    ...
    iotflow.errors.ConfigError: ...
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from iotflow.errors import ConfigError

__all__ = [
    "DEFAULT_BACKUP_S",
    "DEFAULT_SNAPSHOT_S",
    "bind_definition",
    "ensure_store",
    "recovery_on",
    "run_args",
    "store_exists",
]

DEFAULT_SNAPSHOT_S = 5
DEFAULT_BACKUP_S = 0


def store_exists(directory: Path) -> bool:
    """Whether ``directory`` holds Bytewax recovery partitions."""
    return any(Path(directory).glob("part-*.sqlite3"))


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with (directory / ".iotflow.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_store(directory: Path, partitions: int = 1) -> bool:
    """Create the store (and its directory) unless it exists; True when created now.

    Safe against several processes starting at once (a file lock).
    """
    from bytewax.recovery import init_db_dir

    directory = Path(directory)
    if partitions < 1:
        raise ConfigError(f"a recovery store needs at least 1 partition, not {partitions}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create recovery directory {directory}: {exc}") from exc
    if not os.access(directory, os.W_OK):
        raise ConfigError(f"recovery directory {directory} is not writable")
    with _locked(directory):
        if store_exists(directory):
            return False
        init_db_dir(directory, partitions)
        # A definition recorded for an older store does not describe this empty one.
        for stale in directory.glob("iotflow-*.json"):
            stale.unlink()
        return True


def bind_definition(directory: Path, flow: str, definition: dict[str, Any]) -> None:
    """Record ``definition`` (setting name -> value) for ``flow``'s store, or check it.

    The first call for a store records it; later calls raise ``ConfigError``
    when a setting changed, naming each old and new value and the two ways
    out: restore the settings, or use a new recovery directory.
    """
    directory = Path(directory)
    path = directory / f"iotflow-{flow}.json"
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory):
        if path.exists():
            try:
                recorded = json.loads(path.read_text())["definition"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                msg = f"{path} is unreadable ({exc}); delete it only if the store is new"
                raise ConfigError(msg) from exc
            changed = {
                name: (recorded.get(name), definition.get(name))
                for name in sorted(set(recorded) | set(definition))
                if recorded.get(name) != definition.get(name)
            }
            if changed:
                diff = ", ".join(f"{n}={old!r} -> {new!r}" for n, (old, new) in changed.items())
                msg = (
                    f"the recovery store {directory} holds state of the {flow} flow made with "
                    f"other settings ({diff}); resuming would misread its open windows. "
                    f"Restore the old values to resume, or set IOTFLOW_RECOVERY_DIR to a new "
                    f"directory to start the changed flow fresh"
                )
                raise ConfigError(msg)
            return
        path.write_text(json.dumps({"flow": flow, "definition": definition}, indent=2) + "\n")


def run_args(
    directory: Path, snapshot_s: int = DEFAULT_SNAPSHOT_S, backup_s: int = DEFAULT_BACKUP_S
) -> list[str]:
    """The ``python -m bytewax.run`` arguments that turn recovery on (whole seconds:
    ``bytewax.run`` parses them as integers).

    Example::

        >>> run_args(Path("/var/lib/iotflow/telemetry"))
        ['-r', '/var/lib/iotflow/telemetry', '-s', '5', '-b', '0']
    """
    if not isinstance(snapshot_s, int) or snapshot_s < 1:
        raise ConfigError(
            f"snapshot interval {snapshot_s!r} must be a whole number of seconds >= 1"
        )
    if not isinstance(backup_s, int) or backup_s < 0:
        raise ConfigError(f"backup interval {backup_s!r} must be a whole number of seconds >= 0")
    return ["-r", str(directory), "-s", str(snapshot_s), "-b", str(backup_s)]


def recovery_on(
    recovery_dir: Path | None,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Whether this process's flow snapshots go to a recovery store.

    True when ``IOTFLOW_RECOVERY_DIR`` is set (``iotflow run`` and
    ``infra.flowproc`` then add ``-r``) or ``python -m bytewax.run`` was given
    ``-r``/``--recovery-directory`` or ``BYTEWAX_RECOVERY_DIRECTORY``. Sinks
    that wait at each snapshot for their writes to land need to wait only
    then. A flow run by ``bytewax.testing.run_main(recovery_config=...)`` is not
    seen here: such a caller builds its sinks with recovery on explicitly.

    Example::

        >>> recovery_on(None, argv=["run.py", "m:flow"], environ={})
        False
        >>> recovery_on(None, argv=["run.py", "m:flow", "-r", "/s", "-s", "5"], environ={})
        True
    """
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    if recovery_dir is not None or environ.get("BYTEWAX_RECOVERY_DIRECTORY"):
        return True
    return any(
        a in ("-r", "--recovery-directory") or a.startswith("--recovery-directory=") for a in argv
    )
