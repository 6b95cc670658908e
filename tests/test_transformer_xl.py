"""Transformer-XL (Dai et al. 2019): segment-level recurrence in DecoderOnly, stream data, the trainer's memory.

The parity tests compare segment-by-segment application with a memory against one pass over the
concatenated segments with the XL mask built here by hand (query i of segment k attends key j iff
kT - M <= j <= i), computed layer by layer with the reference attention kernel.
"""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import lm_synthetic
from transformer import DecoderOnly, EncoderDecoder, EncoderOnly, ModelConfig, checkpointing, memory, positional
from transformer import sharding, training
from transformer.data import stream
from transformer.layers import DecoderLayer, make_norm
from transformer.models import Embed
from transformer.run_config import TrainConfig

B, T, SEGMENTS, VOCAB = 2, 4, 3, 16


def tiny(**overrides):
    fields = dict(vocab_size=VOCAB, d_model=32, d_ff=64, num_heads=4, num_decoder_layers=2, dropout_rate=0.0)
    return ModelConfig.preset("tiny", **{**fields, **overrides})


def xl_mask(num_segments, length, memory_length):
    """[1, 1, K T, K T]: query i (segment i // T) attends key j iff (i // T) T - M <= j <= i."""
    i = np.arange(num_segments * length)[:, None]
    j = np.arange(num_segments * length)[None, :]
    return jnp.asarray((j <= i) & (j >= (i // length) * length - memory_length))[None, None]


def reference_logits(cfg, params, inputs, mask):
    """One pass over all segments with a dense mask: the reference kernel, explicit positions 0, 1, ..."""
    ref = cfg.replace(attention="reference", memory_length=0)
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    bias = None
    if cfg.position == "relative":
        bias = positional.RelativePositionBias(cfg.num_heads, cfg.relative_num_buckets, cfg.relative_max_distance,
                                               bidirectional=False).apply(
            {"params": params["decoder"]["relative_position_bias"]}, positions, positions)
    elif cfg.position == "alibi":
        bias = positional.alibi_bias(positions, positions, cfg.num_heads)
    embed = Embed(cfg.vocab_size, cfg.d_model)
    y = embed.apply({"params": params["embedding"]}, inputs)
    for i in range(cfg.num_decoder_layers):
        layer = (jax.tree.map(lambda x: x[i], params["decoder"]["layers"]) if cfg.scan_layers
                 else params["decoder"][f"layer_{i}"])
        y = DecoderLayer(ref, cross_attention=False).apply(
            {"params": layer}, y, None, mask, bias, None, positions, None, True, False)
    if cfg.norm_position == "pre":
        y = make_norm(ref, "final_norm").apply({"params": params["decoder"]["final_norm"]}, y)
    return embed.apply({"params": params["embedding"]}, y, method=Embed.attend)


def stream_tokens(seed=0):
    rng = np.random.default_rng(seed)
    targets = jnp.asarray(rng.integers(3, VOCAB, size=(B, SEGMENTS * T)), jnp.int32)
    inputs = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))  # BOS, then the stream shifted by one
    return inputs, targets


SLOW = pytest.mark.slow  # ~5 s each (two compilations); one case runs by default


@pytest.mark.parametrize("position, norm_position, train_memory, eval_memory, scan", [
    # Evaluated with a longer memory than the model was built with, spanning two segments.
    ("rope", "pre", 3, 7, False),
    pytest.param("relative", "pre", 3, 3, False, marks=SLOW),  # a memory shorter than a segment
    pytest.param("relative", "post", 6, 6, False, marks=SLOW),
    pytest.param("alibi", "pre", 6, 6, True, marks=SLOW),  # nn.scan over the layers: memory stacked [L, B, M, D]
])
def test_segments_with_memory_equal_one_pass_with_the_xl_mask(position, norm_position, train_memory, eval_memory,
                                                              scan):
    cfg = tiny(position=position, norm_position=norm_position, memory_length=train_memory, scan_layers=scan)
    inputs, targets = stream_tokens()
    params = nn.meta.unbox(DecoderOnly(cfg).init(jax.random.PRNGKey(1), targets[:, :T])["params"])
    model = DecoderOnly(cfg.replace(memory_length=eval_memory))  # same parameters: they do not depend on M
    step = jax.jit(lambda mem, t, i: model.apply({"params": params, "memory": mem}, t, inputs=i, mutable=["memory"]))
    mem = memory.empty_memory(model, B)
    logits = []
    for k in range(SEGMENTS):
        window = slice(k * T, (k + 1) * T)
        out, updates = step(mem, targets[:, window], inputs[:, window])
        logits.append(out)
        mem = updates["memory"]
    expected = jax.jit(reference_logits, static_argnums=0)(cfg, params, inputs, xl_mask(SEGMENTS, T, eval_memory))
    np.testing.assert_allclose(jnp.concatenate(logits, axis=1), expected, rtol=1e-5, atol=1e-5)
    # The memory is each layer's input at the last M positions; all valid once M positions were read.
    assert mem["decoder"]["valid"].shape == (B, eval_memory) and bool(mem["decoder"]["valid"].all())
    # Not a vacuous match: without the memory, the later segments' logits differ.
    alone, _ = step(memory.empty_memory(model, B), targets[:, T:2 * T], inputs[:, T:2 * T])
    assert float(jnp.abs(alone - logits[1]).max()) > 1e-3


def test_no_gradient_reaches_the_memory():
    cfg = tiny(position="rope", memory_length=4, num_decoder_layers=1)
    model = DecoderOnly(cfg)
    inputs, targets = stream_tokens()
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), targets[:, :T])["params"])
    _, updates = model.apply({"params": params}, targets[:, :T], inputs=inputs[:, :T], mutable=["memory"])
    mem = memory.unbox(updates["memory"])

    def loss(params, mem):
        logits, _ = model.apply({"params": params, "memory": mem}, targets[:, T:2 * T], inputs=inputs[:, T:2 * T],
                                mutable=["memory"])
        return jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(targets[:, T:2 * T], VOCAB))

    def loss_of_hidden(params, hidden):
        m = jax.tree.map(lambda x: x, mem)
        m["decoder"]["layer_0"]["hidden"] = hidden
        return loss(params, m)

    grad_params, grad_memory = jax.jit(jax.grad(loss_of_hidden, argnums=(0, 1)))(
        params, mem["decoder"]["layer_0"]["hidden"])
    assert grad_memory.shape == (B, 4, cfg.d_model) and not np.any(np.asarray(grad_memory)), "gradient leaked"
    # The parameters still learn from the segment (and through the memory's keys and values).
    for name in ("query", "key", "value"):
        assert float(jnp.abs(grad_params["decoder"]["layer_0"]["self_attention"][name]).max()) > 0
    # The memory does change the loss: the zero gradient is the stop-gradient, not an unused input.
    emptied = jax.tree.map(lambda x: x, mem)
    emptied["decoder"]["valid"] = jnp.zeros_like(mem["decoder"]["valid"])
    assert abs(float(jax.jit(loss)(params, mem)) - float(jax.jit(loss)(params, emptied))) > 1e-4


def test_stream_segments_are_consecutive_and_shifted_across_the_boundary():
    tokens = np.arange(3, 3 + 2 * 11, dtype=np.int32)  # N = 22: 2 rows of 11, 2 whole segments of 4 each
    it = stream.StreamIterator(tokens, num_streams=2, length=4)
    assert it.segments_per_epoch == 2
    first, second, third = next(it), next(it), next(it)
    rows = tokens.reshape(2, 11)
    np.testing.assert_array_equal(first["targets"], rows[:, 0:4])
    np.testing.assert_array_equal(second["targets"], rows[:, 4:8])  # the next 4 tokens of the same rows
    np.testing.assert_array_equal(first["inputs"], np.pad(rows[:, 0:3], ((0, 0), (1, 0))))  # BOS first
    np.testing.assert_array_equal(second["inputs"], rows[:, 3:7])  # first input: the last target of segment 0
    np.testing.assert_array_equal(third["targets"], rows[:, 0:4])  # epoch 2 starts over (rows' tails unread)
    assert first["memory_reset"].tolist() == [1, 1] and second["memory_reset"].tolist() == [0, 0]
    assert third["memory_reset"].tolist() == [1, 1]
    resumed = stream.StreamIterator(tokens, num_streams=2, length=4)
    resumed.set_state(it.get_state())
    assert it.get_state() == {"step": 3}
    np.testing.assert_array_equal(next(resumed)["targets"], next(it)["targets"])
    # Each process reads its own rows of the global batch.
    shard = stream.StreamIterator(tokens, num_streams=2, length=4, process_index=1, process_count=2)
    np.testing.assert_array_equal(next(shard)["targets"], rows[1:, 0:4])
    one_pass = stream.StreamIterator(tokens, num_streams=2, length=4, num_epochs=1)
    assert len(list(one_pass)) == 2
    with pytest.raises(ValueError, match="less than one segment"):
        stream.StreamIterator(tokens, num_streams=4, length=8)


def test_char_tokenizer_gives_one_id_per_character():
    from transformer.data import tokenizer  # noqa: PLC0415 -- SentencePiece only here

    texts = ["A dog runs.", "Two men  sit on a bench!", "Ein Hund läuft."]
    tok = tokenizer.train_tokenizer(texts * 20, 100, model_type="char")
    ids = tok.encode("A man sits.")
    assert len(ids) == len("A man sits.") and tokenizer.UNK_ID not in ids
    assert tok.decode(ids) == "A man sits."
    tokens = stream.encode_stream(["A dog", "Hund"], tok)
    assert len(tokens) == len("A dog") + 1 + len("Hund") + 1 and tokens[5] == tok.eos_id


def xl_config(num_steps, memory_length=8):
    config = lm_synthetic.get_config()
    config.model.update(position="rope", memory_length=memory_length, num_layers=1, d_model=32, d_ff=64)
    config.data.update(batching="stream", batch_size=8, eval_batch_size=8, max_length=8, eval_batches=3)
    config.eval_memory_length = 2 * memory_length
    config.dropout = False  # the memory test recomputes a step's forward pass
    config.num_train_steps = num_steps
    config.log_every = 2
    config.eval_every = config.checkpoint.every = 1000
    config.optimizer.warmup_steps = 2
    return config


def trained(num_steps):
    """(trainer, state after `num_steps` stream steps, the stream iterator), checking the memory at each step."""
    run = TrainConfig.from_dict(xl_config(4))
    trainer = training.Trainer(run, run.model, sharding.make_mesh(data=-1))
    it = stream.StreamIterator(stream.synthetic_stream(0, 4096, 32), num_streams=8, length=8)
    state = trainer.init_state(0)
    assert not np.any(jax.device_get(state.memory["decoder"]["valid"]))  # empty before the first segment
    model = DecoderOnly(run.model)
    forward = jax.jit(lambda p, m, t, i: model.apply({"params": p, "memory": m}, t, inputs=i, mutable=["memory"]))
    for _ in range(num_steps):
        batch = next(it)
        before = jax.device_get(state)  # the step donates `state`
        state, _ = trainer.train_step(state, trainer.to_global(batch))
        # The memory after the step is what the model computes from the memory before it.
        _, updates = forward(before.params, before.memory, batch["targets"], batch["inputs"])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     jax.device_get(state.memory), jax.device_get(updates["memory"]))
    assert trainer._train_step._cache_size() == 1  # one compilation for every step
    assert bool(jax.device_get(state.memory["decoder"]["valid"]).all())
    return trainer, state, it


def test_trainer_carries_the_memory_from_step_to_step():
    trained(3)


@pytest.mark.slow  # ~15 s: checkpointing and a second compiled (evaluation) step
def test_checkpoints_hold_the_memory_and_evaluation_carries_its_own(tmp_path):
    trainer, state, it = trained(2)
    ckpt = checkpointing.Checkpointer(str(tmp_path))
    ckpt.save(2, state, it.get_state())
    ckpt.wait()
    restored, data_state, _ = ckpt.restore(trainer.abstract_state)
    ckpt.close()
    assert data_state == {"step": 2}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(jax.device_get(a), jax.device_get(b)),
                 restored.memory, state.memory)
    # A segment at the start of a stream empties the rows' memory first (`memory_reset`).
    reset = memory.reset_rows(jax.device_get(state.memory), np.asarray([1, 0] * 4))
    assert jax.device_get(reset["decoder"]["valid"]).any(axis=1).tolist() == [False, True] * 4

    # Evaluation carries its own, longer memory segment by segment, compiled once.
    evals = [training.evaluate(trainer, state.params, (next(it) for _ in range(3))) for _ in range(2)]
    assert trainer._stream_eval_step._cache_size() == 1 and np.isfinite(evals[0]["bits_per_token"])
    assert jax.tree.map(lambda s: s.shape, trainer._abstract_eval_memory)["decoder"]["valid"].value == (8, 16)


@pytest.mark.slow  # end to end, three runs (~30 s)
def test_resumed_training_with_memory_equals_uninterrupted(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    training.train_and_evaluate(xl_config(8), straight)
    training.train_and_evaluate(xl_config(4), resumed)  # "preempted" after step 4 (saves on its last step)
    final = training.train_and_evaluate(xl_config(8), resumed)  # resumes from 4: params, memory and data
    assert np.isfinite(final["eval_bits_per_token"])

    def restore(workdir):
        run = TrainConfig.from_dict(xl_config(8))
        trainer = training.Trainer(run, run.model, sharding.make_mesh(data=-1))
        ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
        state, data_state, step = ckpt.restore(trainer.abstract_state)
        ckpt.close()
        return jax.device_get(state), data_state, step

    (expected, expected_data, _), (actual, actual_data, step) = restore(straight), restore(resumed)
    assert step == 8 and actual_data == expected_data == {"step": 8}
    assert bool(actual.memory["decoder"]["valid"].all())
    jax.tree.map(np.testing.assert_array_equal, actual, expected)  # bit-identical, memory included


def test_memory_is_refused_where_it_cannot_apply():
    cfg = tiny(position="rope", memory_length=4, num_encoder_layers=1)
    x = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="memory is for DecoderOnly .* not EncoderDecoder"):
        EncoderDecoder(cfg).init(jax.random.PRNGKey(0), x, x)
    with pytest.raises(ValueError, match="not EncoderOnly"):
        EncoderOnly(cfg).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="packed rows"):
        DecoderOnly(cfg).init(jax.random.PRNGKey(0), x, segment_ids=x)


@pytest.mark.parametrize("change, path, message", [
    (dict(batching=None), "model.memory_length", "needs data.batching='stream'"),
    (dict(grad_accum_steps=2), "optimizer.grad_accum_steps", "must be 1 with a Transformer-XL memory"),
    (dict(eval_memory_length=-1), "eval_memory_length", "must be >= 0"),
    (dict(objective="mlm"), "data.batching", "synthetic 'lm' data"),
])
def test_run_config_rejects_memory_without_a_stream(change, path, message):
    config = xl_config(4)
    if "batching" in change:
        config.data.batching = change["batching"]
        config.eval_memory_length = None
    if "grad_accum_steps" in change:
        config.optimizer.grad_accum_steps = change["grad_accum_steps"]
    if "eval_memory_length" in change:
        config.eval_memory_length = change["eval_memory_length"]
    if "objective" in change:
        config.objective = change["objective"]
    with pytest.raises(ValueError, match=f"config.{path}") as error:
        TrainConfig.from_dict(config)
    assert message in str(error.value)


def test_eval_memory_length_is_checked_against_the_model():
    config = xl_config(4, memory_length=0)  # a plain decoder may be evaluated with a memory...
    config.eval_memory_length = 8
    assert TrainConfig.from_dict(config).eval_memory == 8
    config.model.position = "sinusoidal"  # ...but not with absolute positions
    with pytest.raises(ValueError, match="config.eval_memory_length=8 does not suit the model: .*rope"):
        TrainConfig.from_dict(config)
    stored = ml_collections.ConfigDict(xl_config(4).to_dict())
    del stored["eval_memory_length"], stored["data"]["text_feature"]  # a config.json from before these fields
    assert TrainConfig.from_dict(stored).eval_memory == 8


def test_char_lm_variants_differ_in_the_memory_only():
    from experiments.configs import multi30k_char_lm  # noqa: PLC0415

    plain, xl = (TrainConfig.from_dict(multi30k_char_lm.get_config(v)) for v in ("plain", "xl"))
    assert (plain.model.memory_length, plain.eval_memory, xl.model.memory_length, xl.eval_memory) == (0, 0, 64, 64)
    assert plain.model.replace(memory_length=64) == xl.model and plain.model.position == "rope"
    assert dataclasses.replace(plain, model=xl.model, eval_memory_length=64) == xl  # same data, steps, optimizer
    assert xl.data.batching == "stream" and xl.data.tokenizer == "char" and xl.data.text_feature == "en"
    with pytest.raises(ValueError, match="Unknown multi30k_char_lm variant 'big'"):
        multi30k_char_lm.get_config("big")
