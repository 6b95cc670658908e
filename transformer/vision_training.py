"""Image classification with a ViT: the validated config, the pure steps and one train-and-evaluate loop.

    python -m experiments.train_vision --config=experiments/configs/vit_digits.py --workdir=/tmp/vit

The ConfigDict (`experiments.configs.defaults.vision_config`) becomes a `VisionTrainConfig` once,
here; the optimizer and schedule are `transformer.optimizers`', checkpoints `transformer.checkpointing`'s
(orbax), metrics `transformer.metrics`' (`<workdir>/metrics.jsonl` and TensorBoard). The data order
is a function of (seed, step) (`images.batch_indices`), so a resumed run needs only the step.
The final test metrics go to `<workdir>/results.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from transformer import checkpointing, losses, metrics, optimizers, sharding, workdir as workdir_lib
from transformer.config import ModelConfig
from transformer.data import images as images_lib
from transformer.run_config import CheckpointConfig, ConfigError, OptimizerConfig, _Reader
from transformer.steps import TrainState
from transformer.training import TrainingDiverged
from transformer.vision import POOLINGS, ViT, VisionConfig

DATASETS = ("digits", "cifar10")
# ModelConfig fields a ViT never reads (there is no decoder, no token embedding, no memory): must stay unset.
UNREAD_MODEL_FIELDS = ("num_decoder_layers", "share_embeddings", "tie_output", "loss_block_tokens", "memory_length",
                       "max_global_tokens")


@dataclasses.dataclass(frozen=True)
class VisionDataConfig:
    name: str  # one of DATASETS
    batch_size: int  # global images per training step
    eval_batch_size: int
    max_shift: int  # augmentation: random translations of up to this many pixels (0 = none)
    flip: bool  # augmentation: random left-right flips
    split_seed: int | None = None  # digits: seed of the stratified train/test split
    data_dir: str | None = None  # cifar10: TFDS data_dir (None = TFDS's default)


@dataclasses.dataclass(frozen=True)
class VisionTrainConfig:
    """Everything an image-classification run reads, validated."""

    seed: int
    model: ModelConfig  # the encoder; vocab_size is set to the number of classes and not read
    image: VisionConfig
    data: VisionDataConfig
    optimizer: OptimizerConfig
    checkpoint: CheckpointConfig
    label_smoothing: float
    num_train_steps: int
    log_every: int
    eval_every: int

    @classmethod
    def from_dict(cls, config: Mapping) -> "VisionTrainConfig":
        return _VisionReader(strict=True).vision_config(config)


def as_vision_config(config) -> VisionTrainConfig:
    return config if isinstance(config, VisionTrainConfig) else VisionTrainConfig.from_dict(config)


class _VisionReader(_Reader):
    """`transformer.run_config`'s reader (every leaf read once; unknown or inapplicable leaves are errors)."""

    def vision_config(self, config: Mapping) -> VisionTrainConfig:
        f = self.section(config, "")
        top = dict(seed=self.take(f, "seed", int), label_smoothing=self.take(f, "label_smoothing", float),
                   num_train_steps=self.take(f, "num_train_steps", int), log_every=self.take(f, "log_every", int),
                   eval_every=self.take(f, "eval_every", int))
        for name in ("num_train_steps", "log_every", "eval_every"):
            if top[name] <= 0:
                self.fail(name, "must be positive", top[name])
        if not 0.0 <= top["label_smoothing"] < 1.0:
            self.fail("label_smoothing", "is outside [0, 1)", top["label_smoothing"])
        image = self.image(self.section(config, "image"))
        model = self.vit_model(self.section(config, "model"), image)
        run = VisionTrainConfig(**top, model=model, image=image, data=self.image_data(self.section(config, "data")),
                                optimizer=self.optimizer(self.section(config, "optimizer"), top["num_train_steps"]),
                                checkpoint=self.checkpoint(self.section(config, "checkpoint")))
        if run.optimizer.grad_accum_steps != 1:
            self.fail("optimizer.grad_accum_steps", "must be 1: image batches are not split into micro-batches",
                      run.optimizer.grad_accum_steps)
        for name in ("image", "model", "data", "optimizer", "checkpoint"):
            f.pop(name)
        self.done(f, "")
        return run

    def image(self, f: dict) -> VisionConfig:
        out = dict(pooling=self.take(f, "image.pooling", str, choices=POOLINGS))
        for name in ("image_size", "channels", "patch_size", "num_classes"):
            out[name] = self.take(f, f"image.{name}", int)
        self.done(f, "image")
        try:
            return VisionConfig(**out)
        except ValueError as e:
            raise ConfigError(f"config.image: {e}") from e

    def vit_model(self, f: dict, image: VisionConfig) -> ModelConfig:
        preset = self.take(f, "model.preset", str)
        num_layers = self.take(f, "model.num_layers", int, required=False)
        overrides = {k: v for k, v in f.items() if v is not None}
        for name in UNREAD_MODEL_FIELDS:
            self.inapplicable(overrides, f"model.{name}", "to models with a decoder or token embeddings, not a ViT")
        if num_layers is not None:
            overrides["num_encoder_layers"] = num_layers
        try:
            model = ModelConfig.preset(preset, vocab_size=image.num_classes, **overrides)
            image.check_model(model)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config.model: {e}") from e
        self.kernel_options(overrides, model)
        return model

    def image_data(self, f: dict) -> VisionDataConfig:
        p = lambda name: f"data.{name}"  # noqa: E731
        name = self.take(f, p("name"), str, choices=DATASETS)
        out = dict(name=name, batch_size=self.take(f, p("batch_size"), int),
                   eval_batch_size=self.take(f, p("eval_batch_size"), int),
                   max_shift=self.take(f, p("max_shift"), int, required=False) or 0,
                   flip=bool(self.take(f, p("flip"), bool, required=False)))
        if name == "digits":
            out["split_seed"] = self.take(f, p("split_seed"), int)
            self.inapplicable(f, p("data_dir"), "to TFDS datasets (cifar10)")
        else:
            out["data_dir"] = self.take(f, p("data_dir"), str, required=False) or None
            self.inapplicable(f, p("split_seed"), "to data.name='digits' (cifar10 has its own test split)")
        for leaf in ("batch_size", "eval_batch_size"):
            if out[leaf] <= 0:
                self.fail(p(leaf), "must be positive", out[leaf])
        if out["max_shift"] < 0:
            self.fail(p("max_shift"), "must be >= 0 (0 = no translation)", out["max_shift"])
        self.done(f, "data")
        return VisionDataConfig(**out)


def load_data(data: VisionDataConfig) -> images_lib.ImageData:
    if data.name == "digits":
        return images_lib.load_digits(split_seed=data.split_seed)
    return images_lib.load_cifar10(data_dir=data.data_dir)


def check_data(image: VisionConfig, data: images_lib.ImageData) -> None:
    """Raises ConfigError if `config.image` does not describe the dataset's images."""
    shape = (image.image_size, image.image_size, image.channels)
    if data.image_shape != shape or data.num_classes != image.num_classes:
        raise ConfigError(
            f"config.image says {shape} images in {image.num_classes} classes, but the data has {data.image_shape} "
            f"images in {data.num_classes} classes: set config.image.image_size, channels and num_classes to match.")


# ---------------------------------------------------------------------------------------------
# The pure steps: functions of (state or params, batch). A batch is {"images": [B, H, W, C] uint8,
# "labels": [B] int32, "weights": [B] float32 (evaluation: 0 on padding rows)}.


def _statistics(logits, labels, weights, label_smoothing):
    """losses.token_statistics of [B, L] logits, as a length-1 sequence per image."""
    return losses.token_statistics(logits[:, None], labels[:, None], weights[:, None], label_smoothing)


def train_step(state: TrainState, batch: dict, *, model: ViT, tx, schedule, label_smoothing: float,
               normalization: tuple, max_shift: int, flip: bool):
    """One optimizer update: augment, normalise, forward with dropout, mean label-smoothed loss."""
    augment_rng, dropout_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
    x = images_lib.preprocess(batch["images"], augment_rng, *normalization, max_shift=max_shift, flip=flip)
    weights = jnp.ones(batch["labels"].shape, jnp.float32)

    def loss_fn(params):
        logits = model.apply({"params": params}, x, deterministic=False, rngs={"dropout": dropout_rng})
        stats = _statistics(logits, batch["labels"], weights, label_smoothing)
        return stats["loss_sum"] / stats["weight_sum"], stats

    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    return new_state, dict(**stats, grad_norm=optax.tree.norm(grads), learning_rate=schedule(state.step))


def eval_step(params, batch: dict, *, model: ViT, label_smoothing: float, normalization: tuple):
    """Summed loss, correct predictions and weight of `batch`, without augmentation or dropout."""
    x = images_lib.preprocess(batch["images"], None, *normalization)
    logits = model.apply({"params": params}, x, deterministic=True)
    return _statistics(logits, batch["labels"], batch["weights"], label_smoothing)


# ---------------------------------------------------------------------------------------------
# The loop.


class _Compiled:
    """The model, optimizer and jitted init / train / eval functions on a data-parallel mesh."""

    def __init__(self, run: VisionTrainConfig, data: images_lib.ImageData, mesh: jax.sharding.Mesh):
        self.model = ViT(run.model, run.image)
        self.schedule = optimizers.make_schedule(run.optimizer, d_model=run.model.d_model,
                                                 total_steps=run.num_train_steps)
        self.tx = optimizers.make_optimizer(run.optimizer, self.schedule)
        self.mesh, self.rules = mesh, sharding.activation_rules(mesh)
        size = run.image.image_size
        self._dummy = jnp.zeros((1, size, size, run.image.channels), jnp.float32)
        abstract = jax.eval_shape(self._init_boxed, jax.random.PRNGKey(0))
        state_sharding = sharding.tree_shardings(abstract, mesh)
        self.batch_sharding = sharding.batch_sharding(mesh)
        self.abstract_state = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                                           nn.meta.unbox(abstract), state_sharding)
        replicated = sharding.replicated(mesh)
        normalization = (data.pixel_max, data.mean, data.std)
        self._init = jax.jit(lambda rng: nn.meta.unbox(self._init_boxed(rng)), out_shardings=state_sharding)
        self._train = jax.jit(
            functools.partial(train_step, model=self.model, tx=self.tx, schedule=self.schedule,
                              label_smoothing=run.label_smoothing, normalization=normalization,
                              max_shift=run.data.max_shift, flip=run.data.flip),
            in_shardings=(state_sharding, self.batch_sharding), out_shardings=(state_sharding, replicated),
            donate_argnums=(0,))
        self._eval = jax.jit(
            functools.partial(eval_step, model=self.model, label_smoothing=run.label_smoothing,
                              normalization=normalization),
            in_shardings=(state_sharding.params, self.batch_sharding), out_shardings=replicated)

    def _init_boxed(self, rng):
        params = self.model.init({"params": rng}, self._dummy)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                          rng=jax.random.fold_in(rng, 1))

    def _run(self, fn, *args):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return fn(*args)

    def init(self, seed: int) -> TrainState:
        return self._run(self._init, jax.random.PRNGKey(seed))

    def put(self, batch: dict) -> dict:
        return jax.device_put(batch, self.batch_sharding)

    def train(self, state, batch):
        return self._run(self._train, state, self.put(batch))

    def eval(self, params, batch):
        return self._run(self._eval, params, self.put(batch))


def evaluate(compiled: _Compiled, params, images, labels, batch_size: int) -> dict:
    """Loss and accuracy over all of `images` [N, H, W, C] / `labels` [N]; the last batch is padded."""
    totals = None
    for start in range(0, len(images), batch_size):
        rows = slice(start, start + batch_size)
        n = len(images[rows])
        pad = ((0, batch_size - n),)
        batch = dict(images=np.pad(images[rows], pad + ((0, 0),) * 3), labels=np.pad(labels[rows], pad),
                     weights=np.pad(np.ones(n, np.float32), pad))
        sums = compiled.eval(params, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    weight = float(totals["weight_sum"])
    return dict(loss=float(totals["loss_sum"]) / weight, accuracy=float(totals["correct_sum"]) / weight,
                examples=int(weight))


def train_and_evaluate(config, workdir: str, *, data: images_lib.ImageData | None = None) -> dict:
    """Trains `config` (a ConfigDict or VisionTrainConfig) in `workdir`, resuming from its newest intact
    checkpoint; evaluates on the test split; writes `<workdir>/results.json` and returns its contents.

    `data`: the dataset to use instead of loading `config.data.name` (tests pass synthetic images).
    Single process: every batch is read on this host and split over the local devices.
    """
    run = as_vision_config(config)
    os.makedirs(workdir, exist_ok=True)
    with workdir_lib.lock(workdir):
        return _train(config, run, workdir, load_data(run.data) if data is None else data)


def _train(config, run: VisionTrainConfig, workdir: str, data: images_lib.ImageData) -> dict:
    check_data(run.image, data)
    compiled = _Compiled(run, data, sharding.make_mesh())
    logging.info("ViT %s, %s; %s parameters; %d training and %d test images.", run.model, run.image,
                 f"{sum(x.size for x in jax.tree.leaves(compiled.abstract_state.params)):,}",
                 len(data.train_images), len(data.test_images))
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    workdir_lib.check_state_signature(checkpoint_dir, compiled.abstract_state)
    ckpt = checkpointing.Checkpointer(checkpoint_dir, keep=run.checkpoint.keep,
                                      best_metric=run.checkpoint.best_metric, best_mode=run.checkpoint.best_mode)
    try:
        if ckpt.latest_step() is not None:
            state, step = ckpt.restore_intact(compiled.abstract_state)
            logging.info("Resumed from step %d.", step)
        else:
            state = compiled.init(run.seed)
    except BaseException:
        ckpt.close()
        raise
    workdir_lib.write_state_signature(checkpoint_dir, compiled.abstract_state)
    if not isinstance(config, VisionTrainConfig):
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    step = int(state.step)
    writer = metrics.MetricsWriter(workdir, resume_step=step)
    progress = metrics.ProgressLine(run.num_train_steps)
    start_time = time.perf_counter()
    last, eval_metrics = {}, None
    window_sums, window_start, window_steps = None, time.perf_counter(), 0
    try:
        while step < run.num_train_steps:
            # --- step
            rows = images_lib.batch_indices(len(data.train_images), run.data.batch_size, run.seed, step)
            batch = dict(images=data.train_images[rows], labels=data.train_labels[rows])
            state, step_metrics = compiled.train(state, batch)
            step += 1
            window_steps += 1
            window_sums = step_metrics if window_sums is None else jax.tree.map(jnp.add, window_sums, step_metrics)
            done = step == run.num_train_steps
            # --- log
            if step % run.log_every == 0 or done:
                sums = jax.device_get(window_sums)  # the only host sync of the training steps
                if not np.isfinite(sums["loss_sum"]):
                    raise TrainingDiverged(f"Training diverged at step {step}: the loss is not finite. Lower "
                                           "config.optimizer.learning_rate or raise its warmup_steps.")
                elapsed = time.perf_counter() - window_start
                weight = float(sums["weight_sum"])
                last = dict(loss=float(sums["loss_sum"]) / weight, accuracy=float(sums["correct_sum"]) / weight,
                            learning_rate=float(step_metrics["learning_rate"]),
                            grad_norm=float(sums["grad_norm"]) / window_steps, step_time=elapsed / window_steps,
                            images_per_s=weight / elapsed)
                writer.write(step, {f"train/{k}": v for k, v in last.items()})
                progress.update(step, last)
                window_sums, window_start, window_steps = None, time.perf_counter(), 0
            # --- eval
            eval_metrics = None
            if step % run.eval_every == 0 or done:
                eval_metrics = evaluate(compiled, state.params, data.test_images, data.test_labels,
                                        run.data.eval_batch_size)
                writer.write(step, {f"eval/{k}": v for k, v in eval_metrics.items() if k != "examples"})
                logging.info("step %d test %s", step, eval_metrics)
            # --- checkpoint
            if step % run.checkpoint.every == 0 or done:
                ckpt.save(step, state, metrics=None if eval_metrics is None else {
                    f"eval_{k}": v for k, v in eval_metrics.items()})
    finally:
        ckpt.close()
        writer.close()
        progress.close()
    if eval_metrics is None:  # nothing left to train (a finished run started again): evaluate what it holds
        eval_metrics = evaluate(compiled, state.params, data.test_images, data.test_labels, run.data.eval_batch_size)
    results = dict(step=step, test_accuracy=eval_metrics["accuracy"], test_loss=eval_metrics["loss"],
                   test_examples=eval_metrics["examples"], train_examples=len(data.train_images),
                   seconds_this_run=time.perf_counter() - start_time,
                   parameters=sum(x.size for x in jax.tree.leaves(state.params)),
                   **{f"train_{k}": v for k, v in last.items()})
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    logging.info("Results: %s", results)
    return results
