"""Training: train state, optimiser, objectives, sharded steps, and the train-and-evaluate loop.

Built in the order big_vision and the Flax examples use: `jax.eval_shape` of the initialiser ->
shardings from the parameters' logical axis names -> `jit(init, out_shardings=...)` -> train and
eval steps compiled once with explicit in/out shardings and the state donated.

Objectives (`config.objective`):
  * "translation": teacher-forced EncoderDecoder, label-smoothed cross entropy over target tokens;
  * "lm": causal language modelling with DecoderOnly;
  * "mlm": BERT-style masked language modelling with EncoderOnly (15% of tokens, 80/10/10).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from typing import Any, Callable, Iterator

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from transformer import checkpointing, evaluation, losses, metrics, schedules, sharding
from transformer.config import ModelConfig
from transformer.data import pipeline as data_pipeline
from transformer.models import DecoderOnly, EncoderDecoder, EncoderOnly

MODELS = {"translation": EncoderDecoder, "lm": DecoderOnly, "mlm": EncoderOnly}
EOS_ID = 1  # the end-of-sequence id of our vocabularies (synthetic and SentencePiece): never masked in MLM


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2]: folded with the step for each step's dropout / masking


# ---------------------------------------------------------------------------------------------
# Configuration at the boundary.


def model_config(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> ModelConfig:
    """The validated ModelConfig from `config.model` (a preset name plus field overrides).

    `num_layers`, if set, sets both the encoder and decoder depth.
    """
    fields = {k: v for k, v in config.model.items() if k not in ("preset", "num_layers")}
    fields = {k: v for k, v in fields.items() if v is not None or k in ("num_kv_heads", "sliding_window")}
    if config.model.get("num_layers") is not None:
        fields["num_encoder_layers"] = fields["num_decoder_layers"] = config.model.num_layers
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    return ModelConfig.preset(config.model.get("preset", "base"), **fields)


def make_schedule(config: ml_collections.ConfigDict, d_model: int) -> optax.Schedule:
    opt = config.optimizer
    if opt.schedule in ("paper", "rsqrt"):
        return schedules.make_schedule("paper", d_model=d_model, warmup_steps=opt.warmup_steps,
                                       scale=opt.learning_rate)
    if opt.schedule == "inverse_sqrt":
        return schedules.make_schedule("inverse_sqrt", peak_value=opt.learning_rate, warmup_steps=opt.warmup_steps)
    if opt.schedule == "cosine":
        return schedules.make_schedule("cosine", peak_value=opt.learning_rate, warmup_steps=opt.warmup_steps,
                                       total_steps=config.num_train_steps)
    if opt.schedule == "cosine_cycles":  # peaks are learning_rate * cycle_lr_scales
        cycle_steps = tuple(opt.cycle_steps)
        if sum(cycle_steps) != config.num_train_steps:
            raise ValueError(f"optimizer.cycle_steps {cycle_steps} sum to {sum(cycle_steps)}, not to "
                             f"num_train_steps={config.num_train_steps}.")
        return schedules.make_schedule("cosine_cycles",
                                       peak_values=[opt.learning_rate * s for s in opt.cycle_lr_scales],
                                       warmup_steps=opt.cycle_warmup_steps, cycle_steps=cycle_steps)
    return schedules.make_schedule(opt.schedule, value=opt.learning_rate)


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Adam (paper: beta1 0.9, beta2 0.98, eps 1e-9) with optional clipping and decoupled weight decay.

    Weight decay skips biases and normalisation scales (parameters of rank 1).
    """
    opt = config.optimizer
    chain = []
    if opt.clip_grad_norm:
        chain.append(optax.clip_by_global_norm(opt.clip_grad_norm))
    chain.append(optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps))
    if opt.weight_decay:
        chain.append(optax.add_decayed_weights(opt.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
    chain.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*chain)


# ---------------------------------------------------------------------------------------------
# Objectives and steps: pure functions of (params, batch, rng).


def _model_inputs(objective: str, batch: dict, mlm_rng=None, *, vocab_size: int = 0, mask_id: int = 0):
    """(positional args, keyword args, targets [B, T], weights [B, T]) for the model and the loss."""
    if objective == "translation":
        kwargs = {k: batch[k] for k in ("inputs_segment_ids", "targets_segment_ids", "inputs_positions",
                                        "targets_positions") if k in batch}
        targets = batch["targets"]
        return (batch["inputs"], targets), kwargs, targets, (targets > 0).astype(jnp.float32)
    kwargs = {name: batch[f"targets_{name}"] for name in ("segment_ids", "positions") if f"targets_{name}" in batch}
    if objective == "lm":
        targets = batch["targets"]
        return (targets,), kwargs, targets, (targets > 0).astype(jnp.float32)
    inputs, targets, weights = losses.mask_tokens_for_mlm(mlm_rng, batch["targets"], vocab_size=vocab_size,
                                                          mask_id=mask_id, special_ids=(0, EOS_ID))
    return (inputs,), kwargs, targets, weights


def loss_fn(params, batch, rng, *, model, objective, label_smoothing, deterministic, mask_id):
    """Summed label-smoothed loss over real tokens, and (weight_sum, correct_sum, nll_sum)."""
    dropout_rng, mlm_rng = jax.random.split(rng)
    args, kwargs, targets, weights = _model_inputs(objective, batch, mlm_rng, vocab_size=model.config.vocab_size,
                                                   mask_id=mask_id)
    logits = model.apply({"params": params}, *args, **kwargs, deterministic=deterministic,
                         rngs=None if deterministic else {"dropout": dropout_rng})
    loss_sum, weight_sum = losses.cross_entropy_with_label_smoothing(logits, targets, weights, label_smoothing)
    nll_sum, _ = losses.cross_entropy_with_label_smoothing(logits, targets, weights, 0.0)
    correct_sum, _ = losses.weighted_accuracy(logits, targets, weights)
    return loss_sum, dict(weight_sum=weight_sum, correct_sum=correct_sum, nll_sum=nll_sum)


def train_step(state: TrainState, batch: dict, *, model, tx, schedule, objective, label_smoothing, grad_accum_steps,
               dropout: bool, mask_id: int):
    """One optimizer update on `batch`, accumulated over `grad_accum_steps` micro-batches.

    The gradient is that of the loss normalised per real token over the *whole* batch, so k
    micro-batches give the update of one k-times-larger batch.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(
        functools.partial(loss_fn, model=model, objective=objective, label_smoothing=label_smoothing,
                          deterministic=not dropout, mask_id=mask_id), has_aux=True)

    if grad_accum_steps == 1:
        (loss_sum, stats), grads = grad_fn(state.params, batch, rng)
    else:
        # Micro-batch i takes rows i, i+k, i+2k, ...: with the batch split contiguously over data
        # shards, every shard keeps its own rows and no data moves between devices.
        micro = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:]), 0, 1),
            batch)

        def accumulate(carry, xs):
            index, micro_batch = xs
            (loss_sum, stats), grads = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, index))
            return jax.tree.map(jnp.add, carry, (loss_sum, stats, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros((), jnp.float32), dict(
            weight_sum=jnp.zeros(()), correct_sum=jnp.zeros(()), nll_sum=jnp.zeros(())), state.params))
        (loss_sum, stats, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro))

    denominator = jnp.maximum(stats["weight_sum"], 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    step_metrics = dict(loss_sum=loss_sum, **stats, grad_norm=optax.global_norm(grads),
                        learning_rate=schedule(state.step))
    return new_state, step_metrics


def eval_step(params, batch, *, model, objective, label_smoothing, mask_id, rng):
    loss_sum, stats = loss_fn(params, batch, rng, model=model, objective=objective,
                              label_smoothing=label_smoothing, deterministic=True, mask_id=mask_id)
    return dict(loss_sum=loss_sum, **stats)


# ---------------------------------------------------------------------------------------------
# The sharded trainer: state initialisation, compiled steps, device placement of batches.


class Trainer:
    """Owns the mesh, the compiled init/train/eval functions and the shardings. No I/O."""

    def __init__(self, config: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh: jax.sharding.Mesh):
        self.config, self.model_cfg, self.mesh = config, model_cfg, mesh
        self.objective = config.objective
        if self.objective not in MODELS:
            raise ValueError(f"config.objective={self.objective!r}: choose one of {sorted(MODELS)}.")
        self.model = MODELS[self.objective](model_cfg)
        self.schedule = make_schedule(config, model_cfg.d_model)
        self.tx = make_optimizer(config, self.schedule)
        self.rules = sharding.activation_rules(mesh)
        self.mask_id = model_cfg.vocab_size - 1  # MLM: the last id is reserved for [MASK]

        abstract = jax.eval_shape(self._init_boxed, jax.random.PRNGKey(0))
        self.state_sharding = sharding.tree_shardings(abstract, mesh)
        self.batch_sharding = sharding.batch_sharding(mesh)
        replicated = sharding.replicated(mesh)
        self.abstract_state = jax.tree.map(
            lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
            nn.meta.unbox(abstract), self.state_sharding)

        self._init = jax.jit(lambda rng: nn.meta.unbox(self._init_boxed(rng)), out_shardings=self.state_sharding)
        common = dict(model=self.model, objective=self.objective, label_smoothing=config.label_smoothing,
                      mask_id=self.mask_id)
        self._train_step = jax.jit(
            functools.partial(train_step, tx=self.tx, schedule=self.schedule,
                              grad_accum_steps=config.optimizer.grad_accum_steps,
                              dropout=config.get("dropout", True), **common),
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

    def context(self):
        """The mesh and logical-axis rules under which the model's sharding constraints resolve."""
        stack = _ContextStack()
        stack.enter(jax.set_mesh(self.mesh))
        stack.enter(nn.logical_axis_rules(self.rules))
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


class _ContextStack:
    def __init__(self):
        self._contexts = []

    def enter(self, ctx):
        ctx.__enter__()
        self._contexts.append(ctx)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for ctx in reversed(self._contexts):
            ctx.__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# Inputs.


@dataclasses.dataclass
class Inputs:
    """What the trainer reads: this process's shard of the training stream and of the eval split."""

    train: Any  # iterator of {name: int32 [local_batch, length]} with get_state() / set_state()
    eval_batches: Callable[[], Iterator[dict]]  # a fresh pass over the eval split
    vocab_size: int
    tokenizer: Any = None  # real data: the SentencePiece tokenizer (encode / decode / eos_id)
    eval_texts: tuple[list[str], list[str]] | None = None  # translation: (sources, references) for BLEU


def make_inputs(config: ml_collections.ConfigDict, workdir: str) -> Inputs:
    """The inputs `config.data` names: "synthetic", or a dataset `transformer.data` loads."""
    data_cfg = config.data
    process_index, process_count = jax.process_index(), jax.process_count()
    if data_cfg.batch_size % process_count:
        raise ValueError(f"config.data.batch_size={data_cfg.batch_size} is not divisible by the "
                         f"{process_count} processes.")
    local_batch = data_cfg.batch_size // process_count
    if data_cfg.name == "synthetic":
        return _synthetic_inputs(config, local_batch, process_index)
    from transformer import data  # noqa: PLC0415 -- TFDS, grain, sentencepiece only for real data

    load_kwargs = dict(data_dir=data_cfg.get("data_dir") or None, manual_dir=data_cfg.get("manual_dir") or None)
    batch_kwargs = dict(batching=data_cfg.batching, max_length=data_cfg.max_length, seed=config.seed,
                        process_index=process_index, process_count=process_count)
    if data_cfg.batching == "bucket":
        if process_count > 1:
            # NOTE: each host buckets its own shard, so hosts could disagree on a step's batch shape.
            raise ValueError("config.data.batching='bucket' is single-host only: use 'pack' (fixed shapes) "
                             f"with {process_count} processes.")
        batch_kwargs.update(tokens_per_batch=data_cfg.tokens_per_batch // process_count,
                            row_multiple=max(8, jax.local_device_count()))
    else:
        batch_kwargs.update(batch_size=local_batch)
    eval_kwargs = dict(batching="pad", max_length=data_cfg.max_length, shuffle=False, num_epochs=1,
                       batch_size=local_batch, drop_remainder=False, truncate=True,
                       process_index=process_index, process_count=process_count)
    if config.objective == "translation":
        langs = dict(source_lang=data_cfg.source_lang, target_lang=data_cfg.target_lang)
        train_source = data.load_translation_split(data_cfg.name, data_cfg.train_split, **langs, **load_kwargs)
        eval_source = data.load_translation_split(data_cfg.name, data_cfg.eval_split, **langs, **load_kwargs)
        tokenizer = data.load_or_train_tokenizer(
            os.path.join(workdir, "spm"), texts=lambda: data.translation_texts(train_source),
            vocab_size=data_cfg.vocab_size)
        train = data.translation_batches(train_source, tokenizer, **batch_kwargs)
        eval_batches = lambda: _padded_rows(  # noqa: E731
            data.translation_batches(eval_source, tokenizer, **eval_kwargs), local_batch)
        examples = [eval_source[i] for i in range(len(eval_source))]
        eval_texts = ([e["source"] for e in examples], [e["target"] for e in examples])
        return Inputs(train, eval_batches, tokenizer.vocab_size, tokenizer, eval_texts)
    train_source = data.load_text_split(data_cfg.name, data_cfg.train_split, **load_kwargs)
    eval_source = data.load_text_split(data_cfg.name, data_cfg.eval_split, **load_kwargs)
    tokenizer = data.load_or_train_tokenizer(
        os.path.join(workdir, "spm"), texts=lambda: (train_source[i] for i in range(len(train_source))),
        vocab_size=data_cfg.vocab_size)
    train = data.lm_batches(train_source, tokenizer, **batch_kwargs)
    eval_batches = lambda: _padded_rows(data.lm_batches(eval_source, tokenizer, **eval_kwargs), local_batch)  # noqa: E731
    return Inputs(train, eval_batches, tokenizer.vocab_size, tokenizer)


def _synthetic_inputs(config, local_batch: int, process_index: int) -> Inputs:
    from transformer.data import synthetic  # noqa: PLC0415

    data_cfg = config.data
    vocab_size = data_cfg.vocab_size
    if config.objective == "translation":
        fn = functools.partial(synthetic.synthetic_batch, data_cfg.task)
    else:
        fn = synthetic.lm_batch
        if config.objective == "mlm":
            vocab_size -= 1  # the last id is [MASK]: keep it out of the text
    kwargs = dict(batch_size=local_batch, length=data_cfg.max_length, vocab_size=vocab_size)
    # Each process draws its own rows; eval uses a disjoint seed range.
    train = synthetic.SyntheticIterator(fn, seed=config.seed * 1000 + process_index, **kwargs)
    eval_batches = lambda: _take(  # noqa: E731
        synthetic.SyntheticIterator(fn, seed=10**6 + config.seed * 1000 + process_index, **kwargs),
        data_cfg.eval_batches)
    return Inputs(train, eval_batches, data_cfg.vocab_size)


def _padded_rows(batches, rows: int):
    """Pads each batch to `rows` rows of padding (weight 0), so eval compiles one shape per length."""
    for batch in batches:
        yield {k: np.pad(v, ((0, rows - v.shape[0]),) + ((0, 0),) * (v.ndim - 1)) for k, v in batch.items()}


def _take(iterator, n):
    for _ in range(n):
        yield next(iterator)


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
    totals = None
    for batch in batches:
        sums = trainer.eval_step(params, trainer.to_global(batch))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return _summarise(jax.device_get(totals))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final metrics."""
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    inputs = make_inputs(config, workdir)
    model_cfg = model_config(config, inputs.vocab_size)
    mesh = sharding.make_mesh(**config.mesh)
    trainer = Trainer(config, model_cfg, mesh)
    # Global, sharded batches transferred ahead of use; its state is that of the last batch taken.
    train_iter = data_pipeline.prefetch_to_device(inputs.train, 2, trainer.batch_sharding)
    logging.info("Model %s; mesh %s; %s parameters.", model_cfg, dict(mesh.shape),
                 f"{sum(x.size for x in jax.tree.leaves(trainer.abstract_state.params)):,}")

    ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
        best_metric=config.checkpoint.get("best_metric"), best_mode=config.checkpoint.get("best_mode", "min"))
    if ckpt.latest_step() is not None:
        state, data_state, step = ckpt.restore(trainer.abstract_state)
        if data_state is not None:
            train_iter.set_state(data_state)
        logging.info("Resumed from step %d.", step)
    else:
        state = trainer.init_state(config.seed)

    writer = metrics.MetricsWriter(workdir, enabled=is_main)
    flops_per_token = _flops_per_token(model_cfg, config)
    peak = _peak_flops(config)
    total_steps = config.num_train_steps
    progress = metrics.ProgressLine(total_steps, enabled=is_main, max_seconds=60.0 * config.get("max_train_minutes", 0.0))
    translator = None
    if inputs.eval_texts is not None and config.get("bleu_every"):
        translator = evaluation.Translator(
            trainer.model, inputs.tokenizer, beam_size=config.decode.beam_size, alpha=config.decode.alpha,
            batch_size=config.decode.batch_size, max_input_length=config.data.max_length,
            sharding=trainer.batch_sharding)
    stop_signal = _StopSignal(60.0 * config.get("max_train_minutes", 0.0), poll_every=config.log_every)
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
            if step % config.log_every == 0 or step == total_steps or stop:
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
            if step % config.eval_every == 0 or step == total_steps or stop:
                eval_metrics = evaluate(trainer, state.params, inputs.eval_batches())
                if translator is not None and (step % config.bleu_every == 0 or step == total_steps):
                    eval_metrics.update(_bleu(trainer, translator, state.params, inputs, config))
                writer.write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
                last.update({f"eval_{k}": v for k, v in eval_metrics.items()})
                logging.info("step %d eval %s", step, eval_metrics)
            # --- checkpoint
            if step % config.checkpoint.every == 0 or step == total_steps or stop:
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


def _bleu(trainer: Trainer, translator, params, inputs: Inputs, config) -> dict:
    """sacreBLEU (cased and lowercased) on the first `config.decode.bleu_sentences` eval sentences."""
    sources, references = inputs.eval_texts
    n = config.decode.get("bleu_sentences") or len(sources)
    with trainer.context():
        scores = evaluation.evaluate_translations(translator, params, sources[:n], references[:n])
    logging.info("BLEU %.2f (lowercased %.2f) on %d sentences; %s", scores["bleu"], scores["bleu_lc"], n,
                 scores["signature"])
    return dict(bleu=scores["bleu"], bleu_lc=scores["bleu_lc"])


def _flops_per_token(model_cfg: ModelConfig, config) -> float:
    encoder_layers = model_cfg.num_encoder_layers if config.objective in ("translation", "mlm") else 0
    decoder_layers = model_cfg.num_decoder_layers if config.objective in ("translation", "lm") else 0
    length = config.data.max_length
    return metrics.flops_per_token(
        d_model=model_cfg.d_model, d_ff=model_cfg.d_ff, num_heads=model_cfg.num_heads,
        num_encoder_layers=encoder_layers, num_decoder_layers=decoder_layers, vocab_size=model_cfg.vocab_size,
        source_length=length, target_length=length, swiglu=model_cfg.activation == "swiglu")


# Dense peak FLOP/s per device, for the MFU estimate (bfloat16 on accelerators).
_PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
               "H100": 989e12, "H200": 989e12, "A100": 312e12}


def _peak_flops(config) -> float | None:
    if config.get("peak_flops_per_device"):
        return config.peak_flops_per_device
    kind = jax.devices()[0].device_kind
    return next((v for k, v in _PEAK_FLOPS.items() if k in kind), None)
