"""The pure training and evaluation steps: functions of (params, batch, rng), jitted by the Trainer.

Objectives (`TrainConfig.objective`):
  * "translation": teacher-forced EncoderDecoder, label-smoothed cross entropy over target tokens;
  * "lm": causal language modelling with DecoderOnly;
  * "mlm": BERT-style masked language modelling with EncoderOnly (15% of tokens, 80/10/10).
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from transformer import losses, memory as memory_lib, tokens
from transformer.models import DecoderOnly, EncoderDecoder, EncoderOnly

MODELS = {"translation": EncoderDecoder, "lm": DecoderOnly, "mlm": EncoderOnly}


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any
    opt_state: Any
    rng: jax.Array  # PRNG key data: folded with the step for each step's dropout / masking


@flax.struct.dataclass
class MemoryTrainState(TrainState):
    """A TrainState that also carries a Transformer-XL memory from step to step (and into checkpoints).

    NOTE: a subclass rather than an optional field, so that runs without a memory keep the train
    state (and checkpoint tree) they always had, and their old checkpoints still restore.
    """

    memory: Any  # the "memory" collection of the training stream's rows (`transformer.memory`)


def model_inputs(objective: str, batch: dict, mlm_rng=None, *, vocab_size: int = 0, mask_id: int = 0):
    """(positional args, keyword args, targets [B, T], weights [B, T]) for the model and the loss.

    MLM corrupts the targets here, with `mask_id` for [MASK] and replacements drawn from the other
    ids below `vocab_size` (the model's, [MASK] included; see `transformer.tokens`).
    """
    if objective == "translation":
        kwargs = {k: batch[k] for k in ("inputs_segment_ids", "targets_segment_ids", "inputs_positions",
                                        "targets_positions") if k in batch}
        kwargs.update(_global_mask(batch, "inputs_global_mask"))
        targets = batch["targets"]
        return (batch["inputs"], targets), kwargs, targets, (targets > 0).astype(jnp.float32)
    kwargs = {name: batch[f"targets_{name}"] for name in ("segment_ids", "positions") if f"targets_{name}" in batch}
    kwargs.update(_global_mask(batch, "targets_global_mask"))
    if objective == "lm":
        targets = batch["targets"]
        if "inputs" in batch:  # a stream segment: its first input is the previous segment's last token
            kwargs["inputs"] = batch["inputs"]
        return (targets,), kwargs, targets, (targets > 0).astype(jnp.float32)
    inputs, targets, weights = losses.mask_tokens_for_mlm(mlm_rng, batch["targets"], vocab_size=vocab_size,
                                                          mask_id=mask_id, special_ids=tokens.MLM_UNMASKED_IDS)
    return (inputs,), kwargs, targets, weights


def _global_mask(batch: dict, name: str) -> dict:
    """{"global_mask": [B, S] bool} from the batch's `name` (or plain "global_mask") entry, if it has
    one: Longformer global tokens (ModelConfig.max_global_tokens) marked by the data pipeline."""
    for key in (name, "global_mask"):
        if key in batch:
            return {"global_mask": batch[key]}
    return {}


def loss_fn(params, batch, rng, *, model, objective, label_smoothing, deterministic, mask_id, memory=None):
    """Summed label-smoothed loss over real tokens, and (weight_sum, correct_sum, nll_sum).

    With a Transformer-XL `memory` (the "memory" collection), the batch's segment attends to it and
    the stats also hold "memory": the memory for the next segment (no gradient flows into it).
    """
    dropout_rng, mlm_rng = jax.random.split(rng)
    args, kwargs, targets, weights = model_inputs(objective, batch, mlm_rng, vocab_size=model.config.vocab_size,
                                                  mask_id=mask_id)
    block_tokens = model.config.loss_block_tokens
    variables = {"params": params} if memory is None else {"params": params, "memory": memory}
    out = model.apply(variables, *args, **kwargs, deterministic=deterministic, features=block_tokens > 0,
                      # "lsh": fresh LSH rotations each training step, as trax draws them (transformer.reformer).
                      rngs=None if deterministic else {"dropout": dropout_rng,
                                                       "lsh": jax.random.fold_in(dropout_rng, 1)},
                      mutable=False if memory is None else ["memory"])
    if memory is not None:
        out, updates = out
        memory = updates["memory"]
    if block_tokens:
        features, projection = out
        stats = losses.projected_token_statistics(features, projection, targets, weights, label_smoothing,
                                                  dtype=model.config.compute_dtype, chunk_tokens=block_tokens)
    else:
        stats = losses.token_statistics(out, targets, weights, label_smoothing)
    if memory is not None:
        stats["memory"] = memory
    return stats.pop("loss_sum"), stats


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

    carries_memory = isinstance(state, MemoryTrainState)
    if carries_memory:  # Transformer-XL (run_config allows no micro-batches with a memory)
        memory = state.memory
        if "memory_reset" in batch:  # rows whose stream starts over forget what they held
            memory = memory_lib.reset_rows(memory, batch["memory_reset"])
        (loss_sum, stats), grads = grad_fn(state.params, batch, rng, memory=memory)
        new_memory = stats.pop("memory")
    elif grad_accum_steps == 1:
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
    if carries_memory:
        new_state = new_state.replace(memory=new_memory)
    step_metrics = dict(loss_sum=loss_sum, **stats, grad_norm=optax.tree.norm(grads),
                        learning_rate=schedule(state.step))
    return new_state, step_metrics


def eval_step(params, batch, *, model, objective, label_smoothing, mask_id, rng):
    """Summed loss and counts of `batch` with dropout off (MLM masks with the fixed `rng`)."""
    loss_sum, stats = loss_fn(params, batch, rng, model=model, objective=objective,
                              label_smoothing=label_smoothing, deterministic=True, mask_id=mask_id)
    return dict(loss_sum=loss_sum, **stats)


def stream_eval_step(params, memory, batch, *, model, objective, label_smoothing, mask_id, rng):
    """`eval_step` of one stream segment that attends to (and updates) a Transformer-XL `memory`:
    (summed loss and counts, the memory for the next segment)."""
    memory = memory_lib.reset_rows(memory, batch["memory_reset"])
    loss_sum, stats = loss_fn(params, batch, rng, model=model, objective=objective, label_smoothing=label_smoothing,
                              deterministic=True, mask_id=mask_id, memory=memory)
    memory = stats.pop("memory")
    return dict(loss_sum=loss_sum, **stats), memory
