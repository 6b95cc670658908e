"""Where a train step's time goes besides the model: the Adam update, host-to-device transfer,
buffer donation and gradient accumulation, each timed beside the whole step in one run.

    python -m experiments.benchmarks.step_parts --dtype=bfloat16     # the Multi30k shape
    python -m experiments.benchmarks.step_parts --shape=base_32k --rounds=3

On the shapes of `experiments.benchmarks.compare` (full rows of random tokens, dropout on), one
process times, round after round (the median counts, so drift on a shared machine hits all alike):
  * step:            `Trainer.train_step` as shipped (buffers donated);
  * step, no donate: the same function jitted without `donate_argnums`;
  * grads only:      forward + backward (the step without the optimizer);
  * adam only:       the optimizer's update and `optax.apply_updates` on the same gradients;
  * host -> device:  `Trainer.to_global` of one packed batch (6 int32 [B, T] arrays) from NumPy;
  * accumulate k:    `optimizer.grad_accum_steps=k` (k micro-batches of B/k rows, the same update);
  * previous kernels: the step with flax's `nn.LayerNorm` and `jax.nn.dot_product_attention` (XLA's
                     own gradients) in place of `layers.layer_norm` and the CPU attention kernel
                     with written-out gradients (`--previous_kernels`);
  * previous dropout: the step with flax's `nn.Dropout` in place of `transformer.dropout.Dropout`
                     (the same masks, drawn by JAX's CPU Threefry loop; `--previous_dropout`).
"""

import contextlib
import functools
import statistics
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from experiments import cli
from experiments.benchmarks import compare
from experiments.benchmarks.compare import SHAPES
from transformer import attention, layers, models, steps, training

_SHAPE = flags.DEFINE_enum("shape", "multi30k", list(SHAPES), "Which compare.py shape.")
_PREVIOUS = flags.DEFINE_bool("previous_kernels", True,
                              "Also time the step with the kernels before 2026-11-30 (the docstring).")
_FLAX_DROPOUT = flags.DEFINE_bool("previous_dropout", True, "Also time the step with flax's Dropout "
                                  "(`previous dropout`), the masks from jax.random.bernoulli.")
_ACCUM = flags.DEFINE_list("accumulate", ["2", "4"], "Gradient accumulation factors to time (besides 1).")
# --dtype (default float32), --rounds and --steps are compare.py's flags (imported with its shapes).
_DTYPE, _ROUNDS, _STEPS = compare._DTYPE, compare._ROUNDS, compare._STEPS


def make_trainer(shape: str, dtype: str, grad_accum_steps: int = 1) -> training.Trainer:
    return compare.ours_trainer(*SHAPES[shape], dtype=dtype, loss_block_tokens=256, grad_accum_steps=grad_accum_steps)


@contextlib.contextmanager
def previous_kernels():
    """Models built inside use flax's LayerNorm and, on CPU, jax.nn.dot_product_attention for "fused"."""
    def flax_norm(cfg, name):
        axes = ("embed",)
        return nn.LayerNorm(epsilon=cfg.norm_epsilon, dtype=cfg.compute_dtype, name=name,
                            scale_init=nn.with_logical_partitioning(nn.initializers.ones, axes),
                            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes))

    with mock.patch.object(layers, "make_norm", flax_norm), mock.patch.object(models, "make_norm", flax_norm), \
            mock.patch.object(attention, "_platform", lambda: "any"):
        yield


@contextlib.contextmanager
def flax_dropout():
    """Models built inside use flax's Dropout, whose masks come from jax.random.bernoulli (on CPU, a
    rolled Threefry loop) rather than `transformer.dropout.bernoulli` (the same masks)."""
    with mock.patch.object(layers, "Dropout", nn.Dropout), mock.patch.object(models, "Dropout", nn.Dropout):
        yield


def packed_rows(shape: str, seed: int = 0) -> dict:
    """A packed batch as the input pipeline gives it: tokens, segment ids and positions per side."""
    vocab, *_, batch, length, _ = SHAPES[shape]
    rng = np.random.default_rng(seed)
    rows = {k: rng.integers(2, vocab, size=(batch, length), dtype=np.int32) for k in ("inputs", "targets")}
    for side in ("inputs", "targets"):
        rows[f"{side}_segment_ids"] = np.repeat(np.arange(1, 5, dtype=np.int32), length // 4)[None].repeat(batch, 0)
        rows[f"{side}_positions"] = np.tile(np.arange(length // 4, dtype=np.int32), 4)[None].repeat(batch, 0)
    return rows


def main(argv):
    del argv
    shape, dtype = _SHAPE.value, _DTYPE.value
    trainer = make_trainer(shape, dtype)
    rows = packed_rows(shape)
    batch = trainer.to_global(rows)
    tokens = rows["targets"].size
    holder = {"state": trainer.init_state(0), "plain": trainer.init_state(0)}

    plain_step = jax.jit(trainer._train_step.__wrapped__, in_shardings=(trainer.state_sharding, trainer.batch_sharding))
    grad_fn = jax.jit(lambda params, batch, rng: jax.grad(functools.partial(
        steps.loss_fn, model=trainer.model, objective=trainer.objective, label_smoothing=trainer.config.label_smoothing,
        deterministic=False, mask_id=trainer.mask_id), has_aux=True)(params, batch, rng)[0])
    adam = jax.jit(lambda params, grads, opt_state: (lambda u, s: (optax.apply_updates(params, u), s))(
        *trainer.tx.update(grads, opt_state, params)), donate_argnums=(0, 2))
    rng = jax.random.PRNGKey(0)
    with trainer.context():
        grads = grad_fn(holder["state"].params, batch, rng)
        state = holder["state"]
        holder["adam"] = (jax.tree.map(jnp.copy, state.params), jax.tree.map(jnp.copy, state.opt_state))

    def step():
        holder["state"], out = trainer.train_step(holder["state"], batch)
        return out

    def step_plain():
        with trainer.context():
            holder["plain"], out = plain_step(holder["plain"], batch)
        return out

    def grads_only():
        with trainer.context():
            return grad_fn(holder["state"].params, batch, rng)

    def adam_only():
        holder["adam"] = adam(holder["adam"][0], grads, holder["adam"][1])
        return holder["adam"]

    parts = {"step (donated)": step, "step, no donate": step_plain, "grads only": grads_only, "adam only": adam_only,
             "host -> device": lambda: trainer.to_global(rows)}
    for k in map(int, _ACCUM.value):
        other = make_trainer(shape, dtype, grad_accum_steps=k)
        holder[f"acc{k}"] = other.init_state(0)
        other_batch = other.to_global(rows)

        def accumulated(other=other, key=f"acc{k}", other_batch=other_batch):
            holder[key], out = other.train_step(holder[key], other_batch)
            return out

        parts[f"accumulate {k}"] = accumulated
    def patched_step(name, patch):
        with patch:  # traced and compiled here, on the first call
            other = make_trainer(shape, dtype)
            holder[name] = other.init_state(0)
            holder[name], _ = other.train_step(holder[name], batch)

        def patched():
            holder[name], out = other.train_step(holder[name], batch)
            return out

        parts[name] = patched

    if _PREVIOUS.value:
        patched_step("previous kernels", previous_kernels())
    if _FLAX_DROPOUT.value:
        patched_step("previous dropout", flax_dropout())
    for fn in parts.values():  # compile and warm up
        fn()
        jax.block_until_ready(fn())
    times = {name: [] for name in parts}
    for _ in range(_ROUNDS.value):
        for name, fn in parts.items():
            times[name].append(compare.timed(fn, _STEPS.value))
    whole = statistics.median(times["step (donated)"])
    print(f"{shape} {SHAPES[shape][:7]}, {dtype}, JAX {jax.__version__}, {jax.device_count()} x "
          f"{jax.devices()[0].device_kind}; median of {_ROUNDS.value} rounds x {_STEPS.value} calls")
    print("| part | ms | of the step | target tok/s |")
    print("| --- | --- | --- | --- |")
    for name, ts in times.items():
        m = statistics.median(ts)
        rate = f"{tokens / m:,.0f}" if name.startswith(("step", "accumulate", "previous")) else ""
        print(f"| {name} | {m * 1e3:.2f} | {m / whole:.1%} | {rate} |")


if __name__ == "__main__":
    cli.run(main)
