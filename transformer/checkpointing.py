"""Checkpoints that survive preemption: orbax CheckpointManager plus the input iterator's position.

Layout under the checkpoint directory:
  <step>/state/...                         the train state (orbax, sharded, written asynchronously)
  data_state/<step>.process_<i>.json       each process's input-iterator state at that step

The iterator states are written synchronously *before* the orbax save starts, so a checkpoint that
orbax has committed always has its data states. Restoring takes the abstract train state with its
target shardings, so a checkpoint written on one mesh restores onto another.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


class Checkpointer:
    """Keeps the last `keep` checkpoints and the best `keep_best` by `best_metric` (if given)."""

    def __init__(self, directory: str, *, keep: int = 3, best_metric: str | None = None, best_mode: str = "min",
                 keep_best: int = 1, async_save: bool = True):
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode={best_mode!r}: use 'min' (e.g. loss) or 'max' (e.g. BLEU).")
        self.directory = os.path.abspath(directory)
        self.best_metric = best_metric
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

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def delete(self, step: int) -> None:
        """Removes the checkpoint at `step`, e.g. to write it anew."""
        self._manager.delete(step)

    def save(self, step: int, state: Any, data_state: dict | None = None, metrics: dict | None = None) -> None:
        """Saves `state` (asynchronously) and this process's `data_state` (now) at `step`."""
        if data_state is not None:
            os.makedirs(self._data_dir, exist_ok=True)
            path = self._data_path(step, jax.process_index())
            with open(path + ".tmp", "w") as f:
                json.dump(data_state, f)
            os.replace(path + ".tmp", path)  # atomic: never a half-written state
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), metrics=metrics,
                           force=True)
        self._prune_data_states()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict | None, int]:
        """Restores (state, this process's data state or None, step) onto `abstract_state`'s shardings.

        `abstract_state`: a tree of `jax.ShapeDtypeStruct`s carrying the target `sharding`.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        data_state = None
        path = self._data_path(step, jax.process_index())
        if os.path.exists(path):
            with open(path) as f:
                data_state = json.load(f)
        return restored["state"], data_state, step

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def _data_path(self, step: int, process: int) -> str:
        return os.path.join(self._data_dir, f"{step}.process_{process}.json")

    def _prune_data_states(self) -> None:
        """Drops iterator states of checkpoints orbax has deleted (and of none pending)."""
        if not os.path.isdir(self._data_dir):
            return
        live = set(self._manager.all_steps())
        latest = max(live, default=-1)
        for name in os.listdir(self._data_dir):
            step = int(name.split(".")[0])
            if step not in live and step < latest:
                os.remove(os.path.join(self._data_dir, name))


def average_params(checkpointer: Checkpointer, abstract_state: Any, steps: list[int]) -> tuple[Any, int]:
    """The train state of the last of `steps` with parameters averaged over all of them (paper, Sec. 6.1).

    Returns (state, last step). Averaging runs in float32, one checkpoint in memory at a time.
    """
    if not steps:
        raise ValueError(f"No checkpoints to average in {checkpointer.directory}.")
    total = None
    for step in steps:
        state, _, _ = checkpointer.restore(abstract_state, step)
        total = state.params if total is None else jax.tree.map(lambda a, b: a + b, total, state.params)
    averaged = jax.tree.map(lambda x: (x / len(steps)).astype(x.dtype), total)
    return state.replace(params=averaged), steps[-1]
