"""One trainer per workdir, and a workdir that only ever continues the run it holds.

`lock(workdir)` fails at once if another live trainer holds the workdir; a lock left by a killed
one (kill -9, a crash) is recognised by its pid on this host and taken over. `check_state_signature`
compares the train state a run would build with the one its checkpoints hold, so that a changed
model or optimizer is refused before anything in the workdir is overwritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import Any

import jax
from absl import logging

LOCK_FILE = "LOCK"
SIGNATURE_FILE = "state_signature.json"


class WorkdirError(RuntimeError):
    """The workdir is in use, or holds a run that this config cannot continue."""


@contextlib.contextmanager
def lock(workdir: str, *, enabled: bool = True):
    """Holds `<workdir>/LOCK` (pid, host, start time) while the block runs."""
    if not enabled:
        yield
        return
    path = os.path.join(workdir, LOCK_FILE)
    mine = dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%d %H:%M:%S"))
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = read_json(path)
            if holder is None or (holder.get("host") == mine["host"] and not _alive(holder.get("pid", -1))):
                logging.warning("Taking over the lock %s of a trainer that is gone (%s).", path, holder)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            raise WorkdirError(
                f"{workdir} is in use by pid {holder.get('pid')} on host {holder.get('host')} (since "
                f"{holder.get('started')}): two trainers on one workdir would overwrite each other's checkpoints. "
                f"Use another workdir, or, if that process is gone, delete {path}.") from None
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        break
    try:
        yield
    finally:
        if read_json(path) == mine:
            os.remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def read_json(path: str) -> Any:
    """The JSON in `path`, or None if it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def state_signature(abstract_state: Any) -> dict[str, str]:
    """{path in the train state: "dtype[shape]"} for every leaf."""
    return {jax.tree_util.keystr(path): f"{leaf.dtype}{list(leaf.shape)}"
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}


def check_state_signature(checkpoint_dir: str, abstract_state: Any) -> None:
    """Raises WorkdirError if the checkpoints in `checkpoint_dir` hold a train state of another shape."""
    stored = read_json(os.path.join(checkpoint_dir, SIGNATURE_FILE))
    if stored is None:
        return  # a new run, or one from before signatures were written
    ours = state_signature(abstract_state)
    if stored == ours:
        return
    differences = [f"{k}: {stored.get(k, 'absent')} in the checkpoints, {ours.get(k, 'absent')} now"
                   for k in sorted(set(stored) | set(ours)) if stored.get(k) != ours.get(k)]
    raise WorkdirError(
        f"The checkpoints in {checkpoint_dir} hold another model or optimizer than this config builds "
        f"({len(differences)} differences, e.g. {'; '.join(differences[:3])}). Use a new workdir, or the config "
        "the run was trained with (its config.json).")


def write_state_signature(checkpoint_dir: str, abstract_state: Any) -> None:
    os.makedirs(checkpoint_dir, exist_ok=True)
    path = os.path.join(checkpoint_dir, SIGNATURE_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(state_signature(abstract_state), f, indent=0)
    os.replace(path + ".tmp", path)
