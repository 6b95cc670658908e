"""Checkpoints that survive preemption: orbax CheckpointManager plus the input iterator's position.

Layout under the checkpoint directory:
  <step>/state/...                         the train state (orbax, sharded, written asynchronously)
  data_state/<step>.process_<i>.json       each process's input-iterator state at that step

The iterator states are written synchronously *before* the orbax save starts, so a checkpoint that
orbax has committed always has its data states. Restoring takes the abstract train state with its
target shardings, so a checkpoint written on one mesh restores onto another.

A checkpoint is trusted only once it restores and every array in it is finite: `restore_intact`
falls back from a damaged step to the newest intact one and says which and why. Leftovers of
killed saves (`*.orbax-checkpoint-tmp*`) are removed when a Checkpointer opens the directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from transformer.workdir import read_json

TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointError(Exception):
    """A checkpoint (or its data state) that cannot be used; the message names the step or file and why."""


class Checkpointer:
    """Keeps the last `keep` checkpoints and the best `keep_best` by `best_metric` (if given)."""

    def __init__(self, directory: str, *, keep: int = 3, best_metric: str | None = None, best_mode: str = "min",
                 keep_best: int = 1, async_save: bool = True):
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode={best_mode!r}: use 'min' (e.g. loss) or 'max' (e.g. BLEU).")
        self.directory = os.path.abspath(directory)
        self.best_metric = best_metric
        if jax.process_index() == 0:
            remove_leftovers(self.directory)
        policies = [checkpoint_managers.LatestN(keep)]
        if best_metric is not None:
            # BestN sorts ascending and keeps the tail: reverse for metrics where lower is better.
            policies.append(checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == "min", n=keep_best,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._data_dir = os.path.join(self.directory, "data_state")
        self._checksum_dir = os.path.join(self.directory, "checksums")
        self._pending = None  # the step of an asynchronous save not yet known to be committed

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def delete(self, step: int) -> None:
        """Removes the checkpoint at `step`, e.g. to write it anew."""
        self._manager.delete(step)

    def save(self, step: int, state: Any, data_state: dict | None = None, metrics: dict | None = None) -> None:
        """Saves `state` (asynchronously) and this process's `data_state` (now) at `step`.

        Raises CheckpointError, with one message, when the disk cannot hold the checkpoint (checked
        before anything is written) or a save fails (this one, or the previous asynchronous one).
        """
        self._check_space(step, state)
        if data_state is not None:
            os.makedirs(self._data_dir, exist_ok=True)
            path = self._data_path(step, jax.process_index())
            with open(path + ".tmp", "w") as f:
                json.dump(data_state, f)
            os.replace(path + ".tmp", path)  # atomic: never a half-written state
        sums = checksums(state)  # computed on every process (a collective), written by the first
        if jax.process_index() == 0:
            os.makedirs(self._checksum_dir, exist_ok=True)
            path = os.path.join(self._checksum_dir, f"{step}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(sums, f)
            os.replace(path + ".tmp", path)
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        with self._failures_as_errors():
            self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), metrics=metrics,
                               force=True)
        self._pending = step
        self._prune_data_states()

    def _check_space(self, step: int, state: Any) -> None:
        needed = sum(x.nbytes for x in jax.tree.leaves(state))  # the global size: an upper bound per host
        os.makedirs(self.directory, exist_ok=True)
        free = shutil.disk_usage(self.directory).free
        if free < 1.2 * needed + (1 << 20):
            raise CheckpointError(
                f"No room to save step {step}: {free / 2**20:.1f} MiB free in {self.directory}, a checkpoint needs "
                f"about {needed / 2**20:.1f} MiB. Free some space (or lower checkpoint.keep) and run the same command "
                f"again: it resumes from the newest checkpoint, step {self.latest_step()}.")

    @contextlib.contextmanager
    def _failures_as_errors(self):
        """Turns a failed (possibly asynchronous, earlier) save into one CheckpointError; removes its leftovers."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 -- orbax and tensorstore raise many kinds (ValueError for ENOSPC)
            step, self._pending = self._pending, None
            if jax.process_index() == 0:
                remove_leftovers(self.directory)
            raise CheckpointError(f"Saving the checkpoint of step {step} in {self.directory} failed: "
                                  f"{str(e).splitlines()[0][-400:] if str(e) else type(e).__name__}. The newest "
                                  "complete checkpoint is intact; free the cause and run the same command again.") from e

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict | None, int]:
        """Restores (state, this process's data state or None, step) onto `abstract_state`'s shardings.

        `abstract_state`: a tree of `jax.ShapeDtypeStruct`s carrying the target `sharding`. Raises
        CheckpointError if the step does not restore, holds a non-finite value, or has a data state
        file that cannot be read (a missing one gives None).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        return self.restore_state(abstract_state, step), self.read_data_state(step), step

    def restore_intact(self, abstract_state: Any) -> tuple[Any, int]:
        """(state, step) of the newest intact step, falling back past damaged ones (each logged with its reason).

        The data state is not read: see `read_data_state`.
        """
        damaged = []
        for step in reversed(self.all_steps()):
            try:
                state = self.restore_state(abstract_state, step)
            except CheckpointError as e:
                logging.warning("%s; trying the one before.", e)
                damaged.append(step)
                continue
            if damaged:
                logging.warning("Restored step %d, the newest intact checkpoint (damaged: steps %s).", step, damaged)
                self._set_aside(damaged)
            return state, step
        raise CheckpointError(f"No intact checkpoint in {self.directory}: every step ({damaged}) is damaged. "
                              "Move the directory away to start afresh.")

    def restore_state(self, abstract_state: Any, step: int) -> Any:
        """The train state at `step` (no data state); CheckpointError if missing, unrestorable or non-finite."""
        if step not in self.all_steps():
            raise CheckpointError(f"No checkpoint at step {step} in {self.directory}; it has steps {self.all_steps()}.")
        try:
            state = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]
        except Exception as e:  # noqa: BLE001 -- orbax and tensorstore raise many kinds for a damaged step
            raise CheckpointError(f"The checkpoint at step {step} in {self.directory} is damaged: it does not "
                                  f"restore ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})") from e
        if not all_finite(state):
            raise CheckpointError(f"The checkpoint at step {step} in {self.directory} is damaged: it holds "
                                  "non-finite values")
        expected = read_json(os.path.join(self._checksum_dir, f"{step}.json"))
        if expected is not None and expected != checksums(state):
            raise CheckpointError(f"The checkpoint at step {step} in {self.directory} is damaged: its values differ "
                                  "from those saved (checksum mismatch)")
        return state

    def _set_aside(self, steps: list[int]) -> None:
        """Moves damaged steps to `<directory>_damaged/` (kept for inspection), so a resumed run can save them anew."""
        if jax.process_index() == 0:
            target = self.directory + "_damaged"
            os.makedirs(target, exist_ok=True)
            for step in steps:
                destination = os.path.join(target, f"{step}.{int(time.time())}")
                shutil.move(os.path.join(self.directory, str(step)), destination)
                logging.warning("Moved the damaged checkpoint at step %d to %s.", step, destination)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("checkpointing: damaged steps set aside")
        self._manager.reload()

    def read_data_state(self, step: int) -> dict | None:
        """This process's input-iterator state at `step`: None if there is none; CheckpointError if unreadable."""
        path = self._data_path(step, jax.process_index())
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"The data state {path} of step {step} is damaged ({e}).") from e

    def data_state_path(self, step: int) -> str:
        return self._data_path(step, jax.process_index())

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        with self._failures_as_errors():
            self._manager.wait_until_finished()
        self._pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    def _data_path(self, step: int, process: int) -> str:
        return os.path.join(self._data_dir, f"{step}.process_{process}.json")

    def _prune_data_states(self) -> None:
        """Drops iterator states and checksums of checkpoints orbax has deleted (and of none pending)."""
        live = set(self._manager.all_steps())
        latest = max(live, default=-1)
        for directory in (self._data_dir, self._checksum_dir):
            for name in os.listdir(directory) if os.path.isdir(directory) else ():
                step = int(name.split(".")[0])
                if step not in live and step < latest:
                    os.remove(os.path.join(directory, name))


@jax.jit
def _all_finite(leaves):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _as_uint32(x):
    """The bits of `x` as uint32 words (8- and 16-bit values zero-extended, 64-bit values split in two)."""
    if x.dtype == jnp.bool_:  # e.g. a Transformer-XL memory's validity flags: bitcast takes no bool
        return x.astype(jnp.uint32)
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)


@jax.jit
def _checksums(leaves):
    # NOTE: integer addition wraps and is associative, so the sum is exact whatever the sharding
    # or reduction order: the same values give the same checksum on any mesh.
    return jnp.stack([jnp.sum(_as_uint32(x), dtype=jnp.uint32) for x in leaves])


def checksums(tree: Any) -> list[int]:
    """One uint32 checksum of the bits of each array in `tree`: a flipped byte changes its leaf's."""
    leaves = jax.tree.leaves(tree)
    return [int(v) for v in jax.device_get(_checksums(leaves))] if leaves else []


def all_finite(tree: Any) -> bool:
    """Whether every floating-point array in `tree` is finite (one compiled reduction, one host sync)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return bool(_all_finite(leaves)) if leaves else True


def remove_leftovers(directory: str) -> list[str]:
    """Removes what killed saves left in `directory` (orbax tmp directories, half-written data states)."""
    removed = []
    if os.path.isdir(directory):
        for root in (directory, os.path.join(directory, "data_state")):
            for name in os.listdir(root) if os.path.isdir(root) else ():
                path = os.path.join(root, name)
                if TMP_MARKER in name or name.endswith(".json.tmp"):
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
                    removed.append(path)
    if removed:
        logging.warning("Removed %d leftover(s) of interrupted saves: %s", len(removed), removed)
    return removed


def average_params(checkpointer: Checkpointer, abstract_state: Any, steps: list[int]) -> tuple[Any, int]:
    """The train state of the last of `steps` with parameters averaged over all of them (paper, Sec. 6.1).

    Returns (state, last step). Averaging runs in float32, one checkpoint in memory at a time.
    """
    if not steps:
        raise ValueError(f"No checkpoints to average in {checkpointer.directory}.")
    total = None
    for step in steps:
        state = checkpointer.restore_state(abstract_state, step)
        total = state.params if total is None else jax.tree.map(lambda a, b: a + b, total, state.params)
    averaged = jax.tree.map(lambda x: (x / len(steps)).astype(x.dtype), total)
    return state.replace(params=averaged), steps[-1]
