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
import functools
import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from transformer import checkpointing, evaluation, inputs as inputs_lib, metrics, optimizers, runtime, sharding, tokens
from transformer.config import ModelConfig
from transformer.data import pipeline as data_pipeline
from transformer.run_config import TrainConfig, as_train_config
from transformer.steps import MODELS, TrainState, eval_step, train_step

__all__ = ["Trainer", "TrainState", "evaluate", "model_config", "train_and_evaluate"]


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

    def _dummy_inputs(self):
        x = jnp.ones((1, 8), jnp.int32)
        return (x, x) if self.objective == "translation" else (x,)

    def _init_boxed(self, rng):
        """The train state with parameters still boxed with their logical axis names."""
        params = self.model.init({"params": rng}, *self._dummy_inputs())["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                          rng=jax.random.fold_in(rng, 1))

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


# ---------------------------------------------------------------------------------------------
# The loop.


class _StopSignal:
    """Stops the loop on SIGTERM (preemption) or past a wall-clock budget; all processes agree."""

    def __init__(self, max_seconds: float = 0.0, poll_every: int = 1):
        self.requested = False
        self._poll_every = poll_every  # multi-process: agree only every N steps (it costs a host sync)
        self._deadline = time.monotonic() + max_seconds if max_seconds else None
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: preemption is then not handled here
            pass

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if self._deadline is not None and time.monotonic() > self._deadline and not self.requested:
            logging.info("Training time budget reached: saving a checkpoint and stopping.")
            self.requested = True
        if jax.process_count() == 1:
            return self.requested
        if step % self._poll_every:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _summarise(sums: dict) -> dict:
    weight = max(float(sums["weight_sum"]), 1.0)
    out = dict(loss=float(sums["loss_sum"]) / weight, accuracy=float(sums["correct_sum"]) / weight)
    out["perplexity"] = float(np.exp(min(float(sums["nll_sum"]) / weight, 50.0)))
    return out


def evaluate(trainer: Trainer, params, batches) -> dict:
    """Loss, accuracy and perplexity per real token over `batches` (this process's rows of each)."""
    totals = None
    for batch in batches:
        sums = trainer.eval_step(params, trainer.to_global(batch))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return _summarise(jax.device_get(totals))


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains `config` (a ConfigDict) in `workdir`, resuming from its latest checkpoint; returns the final metrics."""
    run = as_train_config(config)
    runtime.use_prng_impl(run.prng_impl)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if is_main and not isinstance(config, TrainConfig):
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    inputs = inputs_lib.make_inputs(run, workdir)
    model_cfg = run.model_config(inputs.vocab_size)
    mesh = sharding.make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor)
    trainer = Trainer(run, model_cfg, mesh)
    # Global, sharded batches transferred ahead of use; its state is that of the last batch taken.
    train_iter = data_pipeline.prefetch_to_device(inputs.train, 2, trainer.batch_sharding)
    logging.info("Model %s; mesh %s; %s parameters.", model_cfg, dict(mesh.shape),
                 f"{sum(x.size for x in jax.tree.leaves(trainer.abstract_state.params)):,}")

    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=run.checkpoint.keep,
                                      best_metric=run.checkpoint.best_metric, best_mode=run.checkpoint.best_mode)
    if ckpt.latest_step() is not None:
        state, data_state, step = ckpt.restore(trainer.abstract_state)
        if data_state is not None:
            train_iter.set_state(data_state)
        logging.info("Resumed from step %d.", step)
    else:
        state = trainer.init_state(run.seed)

    writer = metrics.MetricsWriter(workdir, enabled=is_main)
    flops_per_token = _flops_per_token(model_cfg, run)
    peak = run.peak_flops_per_device or _device_peak_flops()
    total_steps = run.num_train_steps
    progress = metrics.ProgressLine(total_steps, enabled=is_main, max_seconds=60.0 * run.max_train_minutes)
    translator = None
    if run.bleu_every:
        translator = evaluation.Translator.from_config(trainer.model, inputs.tokenizer, run.decode,
                                                       max_input_length=run.data.max_length,
                                                       sharding=trainer.batch_sharding)
    stop_signal = _StopSignal(60.0 * run.max_train_minutes, poll_every=run.log_every)
    step = int(state.step)
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
                ckpt.save(step, state, train_iter.get_state(),
                          metrics=None if eval_metrics is None else {f"eval_{k}": v for k, v in eval_metrics.items()})
            if stop:
                break
    finally:
        ckpt.close()
        writer.close()
        stop_signal.restore()
        progress.close()
    return last


def _bleu(trainer: Trainer, translator, params, inputs: inputs_lib.Inputs, num_sentences: int) -> dict:
    """sacreBLEU (cased and lowercased) on the first `num_sentences` eval sentences (0 = all)."""
    sources, references = inputs.eval_texts
    n = num_sentences or len(sources)
    with trainer.context():
        scores = evaluation.evaluate_translations(translator, params, sources[:n], references[:n])
    logging.info("BLEU %.2f (lowercased %.2f) on %d sentences; %s", scores["bleu"], scores["bleu_lc"], n,
                 scores["signature"])
    return dict(bleu=scores["bleu"], bleu_lc=scores["bleu_lc"])


def _flops_per_token(model_cfg: ModelConfig, run: TrainConfig) -> float:
    encoder_layers = model_cfg.num_encoder_layers if run.objective in ("translation", "mlm") else 0
    decoder_layers = model_cfg.num_decoder_layers if run.objective in ("translation", "lm") else 0
    length = run.data.max_length
    return metrics.flops_per_token(
        d_model=model_cfg.d_model, d_ff=model_cfg.d_ff, num_heads=model_cfg.num_heads,
        num_encoder_layers=encoder_layers, num_decoder_layers=decoder_layers, vocab_size=model_cfg.vocab_size,
        source_length=length, target_length=length, swiglu=model_cfg.activation == "swiglu")


# Dense peak FLOP/s per device, for the MFU estimate (bfloat16 on accelerators).
_PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
               "H100": 989e12, "H200": 989e12, "A100": 312e12}


def _device_peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in _PEAK_FLOPS.items() if k in kind), None)
