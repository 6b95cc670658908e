"""The sharded Trainer and the train-and-evaluate loop.

Built in the order big_vision and the Flax examples use: `jax.eval_shape` of the initialiser ->
shardings from the parameters' logical axis names -> `jit(init, out_shardings=...)` -> train and
eval steps (`transformer.steps`) compiled once with explicit in/out shardings and the state donated.

The experiment's ConfigDict becomes a validated `TrainConfig` at this boundary
(`transformer.run_config`); the optimizer comes from `transformer.optimizers`, the data from
`transformer.inputs`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from transformer import (checkpointing, evaluation, inputs as inputs_lib, metrics, optimizers, runtime, sharding,
                         tokens, tpu, workdir as workdir_lib)
from transformer.config import ModelConfig
from transformer.data import pipeline as data_pipeline
from transformer.run_config import FIT_SKIP_STEPS, TrainConfig, as_train_config
from transformer.steps import MODELS, MemoryTrainState, TrainState, eval_step, stream_eval_step, train_step

__all__ = ["Trainer", "TrainState", "TrainingDiverged", "evaluate", "model_config", "train_and_evaluate"]


def model_config(config, text_vocab_size: int | None = None) -> ModelConfig:
    """The ModelConfig of `config` (a ConfigDict or TrainConfig) for a text vocabulary of that size."""
    return as_train_config(config).model_config(text_vocab_size)


class Trainer:
    """Owns the mesh, the compiled init/train/eval functions and the shardings. No I/O."""

    def __init__(self, config, model_cfg: ModelConfig, mesh: jax.sharding.Mesh):
        self.config = run = as_train_config(config)
        self.model_cfg, self.mesh, self.objective = model_cfg, mesh, run.objective
        self.model = MODELS[run.objective](model_cfg)
        self.schedule = optimizers.make_schedule(run.optimizer, d_model=model_cfg.d_model,
                                                 total_steps=run.num_train_steps)
        self.tx = optimizers.make_optimizer(run.optimizer, self.schedule)
        self.rules = sharding.activation_rules(mesh)
        # MLM: [MASK] is the model's last id, one past the text vocabulary.
        self.mask_id = tokens.mask_id(model_cfg.vocab_size - 1)

        abstract = jax.eval_shape(self._init_boxed, jax.random.PRNGKey(0))
        self.state_sharding = sharding.tree_shardings(abstract, mesh)
        self.batch_sharding = sharding.batch_sharding(mesh)
        replicated = sharding.replicated(mesh)
        self.abstract_state = jax.tree.map(
            lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
            nn.meta.unbox(abstract), self.state_sharding)

        self._init = jax.jit(lambda rng: nn.meta.unbox(self._init_boxed(rng)), out_shardings=self.state_sharding)
        common = dict(model=self.model, objective=run.objective, label_smoothing=run.label_smoothing,
                      mask_id=self.mask_id)
        self._train_step = jax.jit(
            functools.partial(train_step, tx=self.tx, schedule=self.schedule,
                              grad_accum_steps=run.optimizer.grad_accum_steps, dropout=run.dropout, **common),
            in_shardings=(self.state_sharding, self.batch_sharding), out_shardings=(self.state_sharding, replicated),
            donate_argnums=(0,))
        self._eval_step = jax.jit(
            functools.partial(eval_step, rng=jax.random.PRNGKey(0), **common),
            in_shardings=(self.state_sharding.params, self.batch_sharding), out_shardings=replicated)
        # Transformer-XL stream evaluation: segment by segment, carrying a memory of run.eval_memory
        # states (which may exceed the training memory: the parameters are the same).
        self.eval_memory_sharding = None
        if run.data.batching == "stream" and run.eval_memory:
            eval_model = MODELS["lm"](model_cfg.replace(memory_length=run.eval_memory))
            dummy = jnp.ones((run.data.eval_batch_size, 1), jnp.int32)
            self._abstract_eval_memory = jax.eval_shape(eval_model.init, jax.random.PRNGKey(0), dummy)["memory"]
            self.eval_memory_sharding = sharding.tree_shardings(self._abstract_eval_memory, mesh)
            self._stream_eval_step = jax.jit(
                functools.partial(stream_eval_step, rng=jax.random.PRNGKey(0), **dict(common, model=eval_model)),
                in_shardings=(self.state_sharding.params, self.eval_memory_sharding, self.batch_sharding),
                out_shardings=(replicated, self.eval_memory_sharding), donate_argnums=(1,))

    def _dummy_inputs(self):
        # With a Transformer-XL memory, init also makes the (empty) memory of the training batch's rows.
        rows = self.config.data.batch_size if self.model_cfg.memory_length else 1
        x = jnp.ones((rows, 8), jnp.int32)
        return (x, x) if self.objective == "translation" else (x,)

    def _init_boxed(self, rng):
        """The train state with parameters (and a Transformer-XL memory) still boxed with their logical axis names."""
        variables = self.model.init({"params": rng}, *self._dummy_inputs())
        params = variables["params"]
        fields = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                      rng=jax.random.fold_in(rng, 1))
        if "memory" in variables:
            return MemoryTrainState(**fields, memory=variables["memory"])
        return TrainState(**fields)

    def context(self) -> contextlib.ExitStack:
        """The mesh and logical-axis rules under which the model's sharding constraints resolve."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def init_state(self, seed: int) -> TrainState:
        with self.context():
            return self._init(jax.random.PRNGKey(seed))

    def to_global(self, local_batch: dict) -> dict:
        """This process's rows [B / num_processes, ...] -> global arrays [B, ...] sharded over the batch."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                for k, v in local_batch.items()}

    def train_step(self, state: TrainState, batch: dict):
        with self.context():
            return self._train_step(state, batch)

    def eval_step(self, params, batch: dict):
        with self.context():
            return self._eval_step(params, batch)

    def empty_eval_memory(self):
        """An empty Transformer-XL memory for stream evaluation, or None when evaluation keeps none."""
        if self.eval_memory_sharding is None:
            return None
        return jax.tree.map(lambda s, sh: jax.device_put(jnp.zeros(s.shape, s.dtype), sh),
                            nn.meta.unbox(self._abstract_eval_memory), self.eval_memory_sharding)

    def stream_eval_step(self, params, memory, batch: dict):
        """(summed loss and counts, next memory) of one stream segment; `memory` is donated."""
        with self.context():
            return self._stream_eval_step(params, memory, batch)


# ---------------------------------------------------------------------------------------------
# The loop.


class TrainingDiverged(RuntimeError):
    """The loss, gradient norm or parameters became non-finite; nothing non-finite was saved."""


class _StopSignal:
    """Stops the loop on SIGTERM (preemption), Ctrl-C or past a wall-clock budget; all processes agree.

    A first Ctrl-C (SIGINT) asks for a checkpoint and a stop, as SIGTERM does; a second one exits at once.
    """

    def __init__(self, max_seconds: float = 0.0, poll_every: int = 1):
        self.requested = False
        self.signal = None  # "SIGTERM" or "Ctrl-C (SIGINT)" once one asked for the stop (not the budget)
        self._poll_every = poll_every  # multi-process: agree only every N steps (it costs a host sync)
        self._deadline = time.monotonic() + max_seconds if max_seconds else None
        self._previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals are then not handled here
                pass

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            self.restore()
            raise KeyboardInterrupt("second Ctrl-C: exiting without a checkpoint")
        name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C (SIGINT)"
        self.signal = self.signal or name
        logging.warning("%s received: saving a checkpoint and stopping%s.", name,
                        " (Ctrl-C again to exit at once)" if signum == signal.SIGINT else "")
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if self._deadline is not None and time.monotonic() > self._deadline and not self.requested:
            logging.info("Training time budget reached: saving a checkpoint and stopping.")
            self.requested = True
        if jax.process_count() == 1:
            return self.requested
        if step % self._poll_every:
            return False
        # [processes, 2]: who asked for a stop, and who was sent a signal (which all must know alike).
        asked = np.asarray(multihost_utils.process_allgather(np.asarray([self.requested, self.signal is not None])))
        if asked[:, 1].any() and self.signal is None:
            self.signal = "a signal to another process"
        return bool(asked[:, 0].any())

    def seconds_left(self) -> float:
        """Seconds until the wall-clock budget ends the run (infinite without one)."""
        return float("inf") if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def restore(self):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


FITTED_STEPS_FILE = "fitted_steps.json"  # in the workdir: fit_steps_to_budget's decision, kept for resumes
_FIT_MARGIN = 0.97  # of the time left when the steps are fitted: for the evaluations and checkpoints to come


def fitted_steps(step: int, steps_per_second: float, seconds_left: float, configured: int, multiple: int) -> int:
    """The updates a wall-clock budget allows (`fit_steps_to_budget`): `step` done, plus what
    `seconds_left` holds at the measured rate less a margin; at most `configured`, and rounded down
    to a `multiple` (the log interval) when fewer."""
    reachable = step + int(steps_per_second * seconds_left * _FIT_MARGIN)
    if reachable >= configured:
        return configured
    return max(reachable // multiple * multiple, step + 1)


def _with_fitted_steps(run: TrainConfig, workdir: str) -> tuple[TrainConfig, bool]:
    """(`run` with the num_train_steps an earlier invocation fitted to the budget, whether it did).

    A record made for another configured num_train_steps is ignored (the config changed). Process 0
    reads it and all processes take its answer."""
    if not run.fit_steps_to_budget:
        return run, False
    total, path = -1, os.path.join(workdir, FITTED_STEPS_FILE)
    if jax.process_index() == 0 and os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
        if record.get("configured_steps") == run.num_train_steps:
            total = int(record["num_train_steps"])
    total = int(multihost_utils.broadcast_one_to_all(np.asarray(total, np.int32)))
    return (run, False) if total < 0 else (dataclasses.replace(run, num_train_steps=total), True)


def _summarise(sums: dict) -> dict:
    weight = max(float(sums["weight_sum"]), 1.0)
    out = dict(loss=float(sums["loss_sum"]) / weight, accuracy=float(sums["correct_sum"]) / weight)
    out["perplexity"] = float(np.exp(min(float(sums["nll_sum"]) / weight, 50.0)))
    # Bits per token: with a character vocabulary, bits per character (Transformer-XL's metric).
    out["bits_per_token"] = float(sums["nll_sum"]) / weight / float(np.log(2.0))
    return out


def evaluate(trainer: Trainer, params, batches) -> dict:
    """Loss, accuracy, perplexity and bits per real token over `batches` (this process's rows of each).

    Stream segments with an evaluation memory (`TrainConfig.eval_memory`) are read in order, each
    attending to the memory its predecessors left (Transformer-XL's evaluation).
    """
    totals, memory = None, trainer.empty_eval_memory()
    for batch in batches:
        if memory is None:
            sums = trainer.eval_step(params, trainer.to_global(batch))
        else:
            sums, memory = trainer.stream_eval_step(params, memory, trainer.to_global(batch))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return _summarise(jax.device_get(totals))


def train_and_evaluate(config, workdir: str, *, restart_data: bool = False) -> dict:
    """Trains `config` (a ConfigDict) in `workdir`, resuming from its newest intact checkpoint; returns the final metrics.

    A SIGTERM (preemption) or Ctrl-C saves a checkpoint and returns early, with "interrupted_by" in
    the metrics naming the signal; the wall-clock budget (`max_train_minutes`) returns early without it.

    Refuses a workdir that another trainer holds, or whose checkpoints hold another model, before
    writing anything into it. A checkpoint without a readable input-pipeline position is an error
    unless `restart_data`, which starts the data from the beginning. Raises TrainingDiverged when the
    loss or parameters become non-finite (nothing non-finite is saved).
    """
    run = as_train_config(config)
    runtime.use_prng_impl(run.prng_impl)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    with workdir_lib.lock(workdir, enabled=is_main):
        return _train(config, run, workdir, restart_data=restart_data)


def _train(config, run: TrainConfig, workdir: str, *, restart_data: bool) -> dict:
    is_main = jax.process_index() == 0
    configured_steps = run.num_train_steps
    run, fitted_before = _with_fitted_steps(run, workdir)
    inputs = inputs_lib.make_inputs(run, workdir)
    model_cfg = run.model_config(inputs.vocab_size)
    mesh = sharding.make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor)
    trainer = Trainer(run, model_cfg, mesh)
    # Global, sharded batches transferred ahead of use; its state is that of the last batch taken.
    train_iter = data_pipeline.prefetch_to_device(inputs.train, 2, trainer.batch_sharding)
    logging.info("Model %s; mesh %s; %s parameters.", model_cfg, dict(mesh.shape),
                 f"{sum(x.size for x in jax.tree.leaves(trainer.abstract_state.params)):,}")
    compute_dtype = model_cfg.resolved_dtype()
    if model_cfg.dtype == "auto":
        logging.info("ModelConfig.dtype='auto': computing in %s on this %s.", compute_dtype, jax.default_backend())
    runtime.warn_if_slow_dtype(compute_dtype)

    checkpoint_dir = os.path.join(workdir, "checkpoints")
    workdir_lib.check_state_signature(checkpoint_dir, trainer.abstract_state)
    ckpt = checkpointing.Checkpointer(checkpoint_dir, keep=run.checkpoint.keep,
                                      best_metric=run.checkpoint.best_metric, best_mode=run.checkpoint.best_mode)
    try:
        if ckpt.latest_step() is not None:
            state, data_state, step = _restore(ckpt, trainer, restart_data)
            if data_state is not None:
                train_iter.set_state(data_state)
            logging.info("Resumed from step %d.", step)
        else:
            state = trainer.init_state(run.seed)
    except BaseException:
        ckpt.close()
        raise
    # The run can continue what the workdir holds: only now is anything in it written.
    if is_main:
        workdir_lib.write_state_signature(checkpoint_dir, trainer.abstract_state)
        if not isinstance(config, TrainConfig):
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))

    step = int(state.step)
    writer = metrics.MetricsWriter(workdir, enabled=is_main, resume_step=step)
    flops_per_token = metrics.model_flops_per_token(model_cfg, run.objective, run.data.max_length)
    peak = run.peak_flops_per_device or _device_peak_flops()
    total_steps = run.num_train_steps
    progress = metrics.ProgressLine(total_steps, enabled=is_main, max_seconds=60.0 * run.max_train_minutes)
    translator = None
    if run.bleu_every:
        translator = evaluation.Translator.from_config(trainer.model, inputs.tokenizer, run.decode,
                                                       max_input_length=run.data.max_length,
                                                       sharding=trainer.batch_sharding)
    stop_signal = _StopSignal(60.0 * run.max_train_minutes, poll_every=run.log_every)
    # fit_steps_to_budget: the step rate is measured from FIT_SKIP_STEPS in (compiled, warm) to the end of the
    # warmup, where the learning rate does not yet depend on num_train_steps; the fitted count then
    # gives the same schedule as a run configured with it from the start.
    fitting = run.fit_steps_to_budget and run.max_train_minutes > 0 and not fitted_before
    fit_at = run.optimizer.warmup_steps if fitting else None
    fit_from = step + FIT_SKIP_STEPS
    if fit_at is not None and fit_from >= fit_at:
        logging.warning("fit_steps_to_budget: resumed at step %d, too late to measure the step rate before the end "
                        "of the warmup (step %d); training the configured %d steps.", step, fit_at, total_steps)
        fit_at = None
    last = dict()
    window_sums, window_start, window_steps = None, time.perf_counter(), 0
    try:
        while step < total_steps:
            # --- step
            batch = next(train_iter)
            state, step_metrics = trainer.train_step(state, batch)
            step += 1
            window_steps += 1
            window_sums = step_metrics if window_sums is None else jax.tree.map(jnp.add, window_sums, step_metrics)
            stop = stop_signal.should_stop(step)  # preempted, or out of time: evaluate, save, stop
            # --- log
            if step % run.log_every == 0 or step == total_steps or stop:
                sums = jax.device_get(window_sums)  # the only host sync in the loop
                if not np.isfinite(sums["loss_sum"]) or not np.isfinite(sums["grad_norm"]):
                    raise TrainingDiverged(_diverged(step, "the training loss or gradient norm", ckpt, run))
                elapsed = time.perf_counter() - window_start
                tokens_per_s = float(sums["weight_sum"]) / elapsed
                last = dict(_summarise(sums), learning_rate=float(step_metrics["learning_rate"]),
                            grad_norm=float(sums["grad_norm"]) / window_steps, step_time=elapsed / window_steps,
                            tokens_per_s=tokens_per_s)
                if peak:
                    last["mfu"] = tokens_per_s * flops_per_token / (peak * jax.device_count())
                writer.write(step, {f"train/{k}": v for k, v in last.items()})
                progress.update(step, last)
                window_sums, window_start, window_steps = None, time.perf_counter(), 0
            # --- eval
            eval_metrics = None
            if step % run.eval_every == 0 or step == total_steps or stop:
                eval_metrics = evaluate(trainer, state.params, inputs.eval_batches())
                if translator is not None and (step % run.bleu_every == 0 or step == total_steps):
                    eval_metrics.update(_bleu(trainer, translator, state.params, inputs, run.decode.bleu_sentences))
                writer.write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
                last.update({f"eval_{k}": v for k, v in eval_metrics.items()})
                logging.info("step %d eval %s", step, eval_metrics)
            # --- checkpoint
            if step % run.checkpoint.every == 0 or step == total_steps or stop:
                if not checkpointing.all_finite(state.params):
                    raise TrainingDiverged(_diverged(step, "a parameter", ckpt, run))
                ckpt.save(step, state, train_iter.get_state(),
                          metrics=None if eval_metrics is None else {f"eval_{k}": v for k, v in eval_metrics.items()})
            # --- fit the step count to the budget (once, at the end of the warmup)
            if fit_at is not None and step == fit_from:
                jax.block_until_ready(state.step)
                fit_from_time = time.perf_counter()
            if fit_at is not None and step == fit_at and not stop:
                jax.block_until_ready(state.step)
                rate = (step - fit_from) / (time.perf_counter() - fit_from_time)
                total = fitted_steps(step, rate, stop_signal.seconds_left(), total_steps, run.log_every)
                total = int(multihost_utils.broadcast_one_to_all(np.asarray(total, np.int32)))
                if is_main:
                    with open(os.path.join(workdir, FITTED_STEPS_FILE), "w") as f:
                        json.dump(dict(configured_steps=configured_steps, num_train_steps=total, at_step=step,
                                       steps_per_minute=60.0 * rate, minutes_left=stop_signal.seconds_left() / 60), f)
                if total < total_steps:
                    logging.warning("fit_steps_to_budget: %.1f steps/min leave time for %d of the %d steps in the "
                                    "budget; the schedule now ends at step %d.", 60.0 * rate, total, total_steps, total)
                    run = dataclasses.replace(run, num_train_steps=total)
                    trainer = Trainer(run, model_cfg, mesh)  # the same state; a step with the shorter schedule
                    total_steps = progress.total_steps = total
                fit_at = None
            if stop:
                if stop_signal.signal is not None:
                    last["interrupted_by"] = stop_signal.signal
                break
    finally:
        ckpt.close()
        writer.close()
        stop_signal.restore()
        progress.close()
    return last


def _restore(ckpt: checkpointing.Checkpointer, trainer: Trainer, restart_data: bool):
    """(state, data state or None, step) of the newest intact checkpoint; the data state is required,
    except at step 0 (an imported checkpoint: nothing has been read yet, the data starts at its beginning)."""
    state, step = ckpt.restore_intact(trainer.abstract_state)
    if step == 0 and not os.path.exists(ckpt.data_state_path(step)):
        return state, None, step
    try:
        data_state = ckpt.read_data_state(step)
        problem = None if data_state is not None else f"{ckpt.data_state_path(step)} is missing"
    except checkpointing.CheckpointError as e:
        data_state, problem = None, str(e).rstrip(".")
    if problem is not None:
        if not restart_data:
            raise checkpointing.CheckpointError(
                f"{problem}: the input pipeline's position at step {step} is unknown. Pass --restart_data to "
                "start the data from its beginning (batches already trained on come again).")
        logging.warning("%s: restarting the data from its beginning (--restart_data).", problem)
    return state, data_state, step


def _diverged(step: int, what: str, ckpt: checkpointing.Checkpointer, run: TrainConfig) -> str:
    latest = ckpt.latest_step()
    saved = (f"the newest checkpoint, step {latest} in {ckpt.directory}, is finite and a restart resumes from it"
             if latest is not None else "no checkpoint was saved yet")
    return (f"Training diverged at step {step}: {what} is not finite. Stopped without saving; {saved}. Levers: a "
            f"lower optimizer.learning_rate (now {run.optimizer.learning_rate}), a longer optimizer.warmup_steps, "
            "gradient clipping (optimizer.clip_grad_norm, e.g. 1.0).")


def _bleu(trainer: Trainer, translator, params, inputs: inputs_lib.Inputs, num_sentences: int) -> dict:
    """sacreBLEU (cased and lowercased) on the first `num_sentences` eval sentences (0 = all)."""
    sources, references = inputs.eval_texts
    n = num_sentences or len(sources)
    with trainer.context():
        scores = evaluation.evaluate_translations(translator, params, sources[:n], references[:n])
    logging.info("BLEU %.2f (lowercased %.2f) on %d sentences; %s", scores["bleu"], scores["bleu_lc"], n,
                 scores["signature"])
    return dict(bleu=scores["bleu"], bleu_lc=scores["bleu_lc"])


# Dense peak FLOP/s per device, for the MFU estimate (bfloat16 on accelerators).
# TPUs: transformer.tpu.CHIPS (Google's published figures); GPUs: NVIDIA's dense bf16 figures.
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _device_peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    chip = next((c for c in tpu.CHIPS.values() if c.device_kind == kind), None)
    if chip is not None:
        return chip.peak_bf16_flops
    return next((v for k, v in _PEAK_FLOPS.items() if k in kind), None)
