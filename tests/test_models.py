"""The Transformer family end to end: causality, padding, packing, cached decoding, sizes, variants."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformer as tfm
from transformer import decoding, runtime, steps

VOCAB = 40
POSITIONS = ("sinusoidal", "learned", "rope", "relative", "alibi")


def tiny(**overrides):
    base = dict(vocab_size=VOCAB, d_model=32, d_ff=64, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
                max_len=32, relative_num_buckets=8, relative_max_distance=16)
    return tfm.ModelConfig.preset("tiny", **{**base, **overrides})


def tokens(seed, shape, low=1):
    return jnp.asarray(np.random.default_rng(seed).integers(low, VOCAB, size=shape), jnp.int32)


@functools.lru_cache(maxsize=None)
def built(model_cls, cfg, **module_kwargs):
    """(model, params, jitted apply) for a config, initialised once per test session."""
    model = model_cls(cfg, **module_kwargs)
    x = jnp.ones((2, 8), jnp.int32)
    args = (x, x) if model_cls is tfm.EncoderDecoder else (x,)
    params = jax.jit(model.init)(jax.random.key(0), *args)["params"]
    apply = jax.jit(lambda p, *a, **kw: model.apply({"params": p}, *a, **kw))
    return model, params, apply


# ---------------------------------------------------------------------------------------------
# Causality and padding.


@pytest.mark.parametrize("model_cls", [tfm.EncoderDecoder, tfm.DecoderOnly])
def test_changing_future_targets_leaves_past_logits_unchanged(model_cls):
    _, params, apply = built(model_cls, tiny())
    inputs, targets = tokens(0, (2, 7)), tokens(1, (2, 8))
    args = (inputs,) if model_cls is tfm.EncoderDecoder else ()
    logits = apply(params, *args, targets)
    for t in (0, 3, 6):
        changed = targets.at[:, t:].set(tokens(2 + t, (2, 8 - t), low=0))  # padding included
        new = apply(params, *args, changed)
        np.testing.assert_allclose(new[:, :t + 1], logits[:, :t + 1], atol=1e-5)
        assert not np.allclose(new[:, t + 1:], logits[:, t + 1:], atol=1e-3)


def test_padding_does_not_change_real_logits():
    _, params, apply = built(tfm.EncoderDecoder, tiny())
    inputs = jnp.array([[5, 6, 7, 8, 0], [9, 10, 0, 0, 0]])
    targets = jnp.array([[11, 12, 13, 0], [14, 15, 16, 17]])
    short = apply(params, inputs, targets)
    long = apply(params, jnp.pad(inputs, ((0, 0), (0, 6))), jnp.pad(targets, ((0, 0), (0, 5))))
    real = np.asarray(targets != 0)
    np.testing.assert_allclose(np.asarray(long[:, :4])[real], np.asarray(short)[real], atol=1e-5)


@pytest.mark.parametrize("model_cls", [tfm.DecoderOnly, tfm.EncoderOnly])
def test_padding_single_stack_models(model_cls):
    _, params, apply = built(model_cls, tiny())
    x = jnp.array([[5, 6, 7, 8, 0], [9, 10, 0, 0, 0]])
    short, long = apply(params, x), apply(params, jnp.pad(x, ((0, 0), (0, 4))))
    real = np.asarray(x != 0)
    np.testing.assert_allclose(np.asarray(long[:, :5])[real], np.asarray(short)[real], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Packing: two sequences in one row give the logits each gives alone.


def pack(a, b, length):
    """Packs two 1-D token arrays into one row: (tokens, segment_ids, positions), each [1, length]."""
    pad = length - len(a) - len(b)
    row = np.concatenate([a, b, np.zeros(pad, np.int32)])
    segments = np.concatenate([np.full(len(a), 1), np.full(len(b), 2), np.zeros(pad)]).astype(np.int32)
    positions = np.concatenate([np.arange(len(a)), np.arange(len(b)), np.zeros(pad)]).astype(np.int32)
    return jnp.asarray(row[None]), jnp.asarray(segments[None]), jnp.asarray(positions[None])


@pytest.mark.parametrize("position", POSITIONS)
def test_packed_rows_equal_separate_rows_encoder_decoder(position):
    _, params, apply = built(tfm.EncoderDecoder, tiny(position=position, sliding_window=4))
    src = [np.array([3, 4, 5], np.int32), np.array([6, 7, 8, 9, 10], np.int32)]
    tgt = [np.array([11, 12, 13, 14], np.int32), np.array([15, 16, 17], np.int32)]
    inputs, in_seg, in_pos = pack(*src, 10)
    targets, tgt_seg, tgt_pos = pack(*tgt, 9)
    packed = apply(params, inputs, targets, inputs_segment_ids=in_seg, targets_segment_ids=tgt_seg,
                   inputs_positions=in_pos, targets_positions=tgt_pos)
    alone = [apply(params, jnp.asarray(s[None]), jnp.asarray(t[None]))[0] for s, t in zip(src, tgt)]
    np.testing.assert_allclose(packed[0, :4], alone[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 4:7], alone[1], atol=1e-5)


@pytest.mark.parametrize("model_cls", [tfm.DecoderOnly, tfm.EncoderOnly])
@pytest.mark.parametrize("position", ["rope", "relative"])
def test_packed_rows_single_stack(model_cls, position):
    _, params, apply = built(model_cls, tiny(position=position))
    seqs = [np.array([3, 4, 5], np.int32), np.array([6, 7, 8, 9, 10], np.int32)]
    row, seg, pos = pack(*seqs, 10)
    packed = apply(params, row, segment_ids=seg, positions=pos)
    np.testing.assert_allclose(packed[0, :3], apply(params, jnp.asarray(seqs[0][None]))[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 3:8], apply(params, jnp.asarray(seqs[1][None]))[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Incremental decoding with the key/value cache.


def decode_step_by_step(model, params, decoder_inputs, *prefix):
    """Feeds decoder_inputs [B, T] one position at a time through the cache; returns [B, T, V]."""
    cache = model.init(jax.random.key(0), *prefix, decoder_inputs, decode=True, method=model.decode)["cache"]

    @jax.jit
    def step(cache, token):
        logits, mutated = model.apply({"params": params, "cache": cache}, *prefix, token, decode=True,
                                      method=model.decode, mutable=["cache"])
        return mutated["cache"], logits

    outputs = []
    for t in range(decoder_inputs.shape[1]):
        cache, logits = step(cache, decoder_inputs[:, t:t + 1])
        outputs.append(logits[:, 0])
    return jnp.stack(outputs, axis=1)


@pytest.mark.parametrize("position", POSITIONS)
def test_cached_decoding_matches_full_forward_encoder_decoder(position):
    model, params, apply = built(tfm.EncoderDecoder, tiny(position=position, sliding_window=3))
    inputs = jnp.array([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    targets = tokens(3, (2, 7))
    full = apply(params, inputs, targets)
    encoded = model.apply({"params": params}, inputs, method=model.encode)
    stepped = decode_step_by_step(model, params, tfm.shift_right(targets), encoded, inputs)
    np.testing.assert_allclose(stepped, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_decoding_projects_the_encoder_keys_once(scan_layers):
    # The encoder-decoder attention's keys and values are made with the cache and read back: later
    # steps give the same logits with the encoder output replaced by zeros.
    model, params, _ = built(tfm.EncoderDecoder, tiny(scan_layers=scan_layers))
    inputs = jnp.array([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    encoded = model.apply({"params": params}, inputs, method=model.encode)
    cache = decoding.init_cache(model, params, 4, 2, encoded, inputs)
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(cache)}
    assert any("cross_attention" in n and "static_key" in n for n in names)
    assert not any("self_attention" in n and "static_key" in n for n in names)
    token = jnp.array([[0], [0]])
    with_encoded = decoding.encoder_decoder_step_fn(model, params, encoded, inputs)(token, cache)[0]
    with_zeros = decoding.encoder_decoder_step_fn(model, params, jnp.zeros_like(encoded), inputs)(token, cache)[0]
    np.testing.assert_array_equal(with_zeros, with_encoded)


@pytest.mark.parametrize("overrides", [dict(position="rope", num_kv_heads=2), dict(scan_layers=True, position="alibi"),
                                       dict(norm_position="pre", attention="chunked", attention_chunk_size=3)])
def test_cached_decoding_matches_full_forward_decoder_only(overrides):
    model, params, apply = built(tfm.DecoderOnly, tiny(**overrides))
    targets = tokens(4, (2, 7))
    full = apply(params, targets)
    stepped = decode_step_by_step(model, params, tfm.shift_right(targets))
    np.testing.assert_allclose(stepped, full, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Sizes against the paper's Table 3.


def count_params(model_cls, cfg):
    x = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    args = (x, x) if model_cls is tfm.EncoderDecoder else (x,)
    shapes = jax.eval_shape(model_cls(cfg).init, jax.random.key(0), *args)
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes["params"]))


def test_base_parameter_count():
    count = count_params(tfm.EncoderDecoder, tfm.ModelConfig.preset("base", vocab_size=37000))
    assert 62.5e6 <= count <= 66e6, count
    # Embedding 37000*512 + 6 encoder layers (4*512^2 attention + FFN 2*512*2048 + biases + 2 norms)
    # + 6 decoder layers (one more attention and norm): the paper's "65M".
    d, f = 512, 2048
    encoder_layer = 4 * d * d + 2 * d * f + f + d + 4 * d
    decoder_layer = 8 * d * d + 2 * d * f + f + d + 6 * d
    assert count == 37000 * d + 6 * encoder_layer + 6 * decoder_layer


def test_big_parameter_count():
    count = count_params(tfm.EncoderDecoder, tfm.ModelConfig.preset("big", vocab_size=37000))
    assert abs(count - 213e6) / 213e6 < 0.02, count


# ---------------------------------------------------------------------------------------------
# Every variant initialises, runs under jit, differentiates and runs in bfloat16.

VARIANTS = {
    "paper": dict(),
    "pre_rms_swiglu_gqa": dict(norm_position="pre", norm="rmsnorm", activation="swiglu", num_kv_heads=2,
                               position="rope"),
    "scan_remat_untied": dict(scan_layers=True, remat=True, tie_output=False, share_embeddings=False,
                              position="relative", activation="gelu"),
    "chunked_alibi_window": dict(attention="chunked", attention_chunk_size=4, position="alibi", sliding_window=3),
    "reference_learned_dropout": dict(attention="reference", position="learned", attention_dropout_rate=0.1),
}


# The default suite runs each variant once, on the model kind it matters most for (every kind at
# least once); the slow run covers the rest of the product (~3 minutes of compiling, cold, on 2 cores).
DEFAULT_KIND = {"paper": tfm.EncoderDecoder, "scan_remat_untied": tfm.EncoderDecoder,
                "pre_rms_swiglu_gqa": tfm.DecoderOnly, "chunked_alibi_window": tfm.DecoderOnly,
                "reference_learned_dropout": tfm.EncoderOnly}
VARIANT_CASES = [(variant, model_cls) if DEFAULT_KIND[variant] is model_cls
                 else pytest.param(variant, model_cls, marks=pytest.mark.slow)
                 for model_cls in (tfm.EncoderDecoder, tfm.DecoderOnly, tfm.EncoderOnly)
                 for variant in sorted(VARIANTS)]


@pytest.mark.parametrize("variant, model_cls", VARIANT_CASES)
def test_variant_jits_differentiates_and_runs_in_bfloat16(variant, model_cls):
    cfg = tiny(num_encoder_layers=1, num_decoder_layers=2, **VARIANTS[variant])
    model = model_cls(cfg)
    x = tokens(5, (2, 6))
    args = (x, x) if model_cls is tfm.EncoderDecoder else (x,)
    params = jax.jit(model.init)(jax.random.key(0), *args)["params"]

    @jax.jit
    def loss_and_grad(params, rng):
        def loss(params):
            logits = model.apply({"params": params}, *args, rngs={"dropout": rng})
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, x[..., None], -1)[..., 0])
        return jax.value_and_grad(loss)(params)

    value, grads = loss_and_grad(params, jax.random.key(1))
    assert np.isfinite(value)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    assert np.isfinite(grad_norm) and grad_norm > 0

    bf16 = model_cls(cfg.replace(dtype="bfloat16"))
    logits = jax.jit(bf16.apply)({"params": params}, *args)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 6, VOCAB)
    reference = jax.jit(model.apply)({"params": params}, *args)
    np.testing.assert_allclose(logits, reference, atol=0.25)  # bfloat16 keeps ~3 significant digits


def test_auto_dtype_computes_in_bfloat16_only_where_it_is_fast(monkeypatch):
    cfg = tiny(num_encoder_layers=1, num_decoder_layers=1)
    _, params, _ = built(tfm.EncoderDecoder, cfg)
    x = tokens(7, (2, 6))

    def logits(dtype):
        return jax.jit(tfm.EncoderDecoder(cfg.replace(dtype=dtype)).apply)({"params": params}, x, x)

    want = {dtype: logits(dtype) for dtype in ("float32", "bfloat16")}
    assert not np.array_equal(want["float32"], want["bfloat16"])
    for fast, dtype in ((False, "float32"), (None, "float32"), (True, "bfloat16")):  # None: flags unknown
        monkeypatch.setattr(runtime, "cpu_has_fast_bfloat16", lambda fast=fast: fast)
        np.testing.assert_array_equal(logits("auto"), want[dtype])
    assert cfg.replace(dtype="auto").resolved_dtype("tpu") == "bfloat16"
    with pytest.raises(ValueError, match="dtype='bf16' is not one of"):
        cfg.replace(dtype="bf16")


def test_dropout_only_with_a_dropout_rng():
    model, params, apply = built(tfm.EncoderDecoder, tiny())
    x = tokens(6, (2, 6))
    plain = apply(params, x, x)
    np.testing.assert_allclose(plain, model.apply({"params": params}, x, x, deterministic=True), atol=1e-5)
    dropped = apply(params, x, x, rngs={"dropout": jax.random.key(0)})
    assert not np.allclose(dropped, plain, atol=1e-3)


def test_parameters_carry_logical_axis_names():
    model = tfm.EncoderDecoder(tiny(scan_layers=True))
    x = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), x, x)["params"]
    names = jax.tree.leaves(
        jax.tree.map(lambda p: p.names, boxed, is_leaf=lambda p: hasattr(p, "names")),
        is_leaf=lambda n: isinstance(n, tuple))
    assert len(names) == len(jax.tree.leaves(boxed))  # every parameter is annotated
    assert ("vocab", "embed") in names
    assert ("layers", "embed", "heads", "head_dim") in names
    assert ("layers", "embed", "mlp") in names


def test_pooled_head_and_long_input_error():
    model = tfm.EncoderOnly(tiny(), num_classes=3)
    x = tokens(7, (2, 6))
    variables = model.init(jax.random.key(0), x)
    assert model.apply(variables, x).shape == (2, 3)
    learned = tfm.EncoderOnly(tiny(position="learned", max_len=8))
    with pytest.raises(ValueError, match="exceeds ModelConfig.max_len=8"):
        learned.init(jax.random.key(0), tokens(8, (1, 9)))


@pytest.mark.parametrize("model_cls", [tfm.EncoderDecoder, tfm.DecoderOnly])  # the encoder: in EncoderDecoder
def test_splash_attention_model_matches_reference_on_packed_padded_rows(model_cls):
    """The Pallas splash kernel (interpret mode here) in every attention of a model, packed rows and
    padding included, gives the reference kernel's logits; its cached decoding falls back correctly."""
    cfg = tiny(num_encoder_layers=1, num_decoder_layers=1, num_kv_heads=2, position="rope")
    model, params, _ = built(model_cls, cfg.replace(attention="reference"))
    splash = model_cls(cfg.replace(attention="splash"))
    segment_ids = jnp.array([[1, 1, 1, 1, 2, 2, 2, 3, 3, 0, 0, 0], [1] * 9 + [0] * 3])
    positions = jnp.array([[0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 0, 0], list(range(9)) + [0] * 3])
    x = jnp.where(segment_ids > 0, tokens(11, (2, 12)), 0)
    if model_cls is tfm.EncoderDecoder:
        args, kwargs = (x, x), dict(inputs_segment_ids=segment_ids, targets_segment_ids=segment_ids,
                                    inputs_positions=positions, targets_positions=positions)
    else:
        args, kwargs = (x,), dict(segment_ids=segment_ids, positions=positions)
    expected = model.apply({"params": params}, *args, **kwargs)
    got = jax.jit(lambda p: splash.apply({"params": p}, *args, **kwargs))(params)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=2e-5)
    if model_cls is tfm.DecoderOnly:
        targets = tokens(4, (2, 7))
        stepped = decode_step_by_step(splash, params, tfm.shift_right(targets))
        np.testing.assert_allclose(stepped, model.apply({"params": params}, targets), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The fused output projection and loss (ModelConfig.loss_block_tokens).


@pytest.mark.parametrize("objective,tied", [("translation", True), ("translation", False), ("lm", True),
                                            ("mlm", False)])
def test_fused_loss_equals_the_loss_of_the_full_logits(objective, tied):
    cfg = tiny(tie_output=tied, share_embeddings=tied)
    model_cls = steps.MODELS[objective]
    model, params, _ = built(model_cls, cfg)
    batch = {"inputs": tokens(1, (2, 8)), "targets": tokens(2, (2, 8)).at[1, 5:].set(0)}
    rng = jax.random.key_data(jax.random.key(3))

    def loss(params, block_tokens):
        m = model_cls(cfg.replace(loss_block_tokens=block_tokens))
        return steps.loss_fn(params, batch, rng, model=m, objective=objective, label_smoothing=0.1,
                             deterministic=True, mask_id=VOCAB - 1)

    (full, full_stats), full_grads = jax.value_and_grad(loss, has_aux=True)(params, 0)
    (fused, fused_stats), fused_grads = jax.value_and_grad(loss, has_aux=True)(params, 4)
    np.testing.assert_allclose(fused, full, rtol=1e-5)
    for key in full_stats:
        np.testing.assert_allclose(fused_stats[key], full_stats[key], rtol=1e-5, err_msg=key)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(full_grads)]
    assert any("embedding" in p for p in paths) and (tied or any("logits" in p for p in paths))
    for path, got, want in zip(paths, jax.tree.leaves(fused_grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=path)


@pytest.mark.parametrize("packed", [False, True])
def test_cpu_kernels_give_the_gradient_of_the_portable_path(monkeypatch, packed):
    """On CPU in float32 the projections (stored-operand gradients), attention without a bias (its
    own VJP) and the fused loss take CPU-only code; the whole loss and its gradient must be those of
    the code every other platform runs, on padded and on packed rows."""
    cfg = tiny(loss_block_tokens=4)
    model, params, _ = built(tfm.EncoderDecoder, cfg)
    segment_ids = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 2, 2, 2, 0, 0, 0]], jnp.int32)
    batch = {name: jnp.where(segment_ids > 0, tokens(seed, (2, 8)), 0) for seed, name in enumerate(("inputs", "targets"))}
    if packed:
        positions = jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 0, 1, 2, 0, 0, 0]], jnp.int32)
        batch.update(inputs_segment_ids=segment_ids, targets_segment_ids=segment_ids, inputs_positions=positions,
                     targets_positions=positions)
    rng = jax.random.key_data(jax.random.key(3))

    def loss_and_grads(platform):
        monkeypatch.setattr(runtime, "trace_platform", lambda: platform)
        grad_fn = jax.value_and_grad(functools.partial(
            steps.loss_fn, batch=batch, rng=rng, model=model, objective="translation", label_smoothing=0.1,
            deterministic=True, mask_id=VOCAB - 1), has_aux=True)
        return str(jax.make_jaxpr(grad_fn)(params)), jax.jit(grad_fn)(params)

    cpu_jaxpr, ((cpu_loss, cpu_stats), cpu_grads) = loss_and_grads("cpu")
    gpu_jaxpr, ((gpu_loss, gpu_stats), gpu_grads) = loss_and_grads("gpu")
    assert "optimization_barrier" in cpu_jaxpr and "optimization_barrier" not in gpu_jaxpr  # two paths ran
    np.testing.assert_allclose(cpu_loss, gpu_loss, rtol=1e-5)
    for key in gpu_stats:
        np.testing.assert_allclose(cpu_stats[key], gpu_stats[key], rtol=1e-5, err_msg=key)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(cpu_grads), jax.tree.leaves(gpu_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
