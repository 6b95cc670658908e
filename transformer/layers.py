"""Encoder and decoder layers (paper, Sec. 3.1) and their sub-layers.

Each sub-layer (attention or feed-forward) is wrapped in a residual connection with dropout and
layer normalisation, either after the sum as in the paper ("post": LayerNorm(x + Dropout(F(x))))
or before the sub-layer ("pre": x + Dropout(F(LayerNorm(x))), more stable for deep stacks).

Layer signatures are positional, with the mode flags last, so that `nn.scan` and `nn.remat` can
wrap them (`static_argnums` counts from the end).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer import memory as memory_lib, precision
from transformer.attention import MultiHeadAttention, dense_kernel
from transformer.config import ModelConfig
from transformer.dropout import Dropout

_ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu}


class FeedForward(nn.Module):
    """Position-wise feed-forward network (paper, eq. 2): max(0, x W1 + b1) W2 + b2.

    `activation="swiglu"` is Shazeer (2020)'s gated variant: (silu(x W_gate) * x W1) W2, without biases.
    """

    d_ff: int
    activation: str = "relu"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        """[B, T, D] -> [B, T, D]."""
        d_model = x.shape[-1]
        x = x.astype(self.dtype)
        use_bias = self.activation != "swiglu"
        hidden = dense(self, "wi", x, self.d_ff, ("embed", "mlp"), use_bias)  # [B, T, F]
        if self.activation == "swiglu":
            hidden = nn.silu(dense(self, "wi_gate", x, self.d_ff, ("embed", "mlp"), False)) * hidden
        else:
            hidden = _ACTIVATIONS[self.activation](hidden)
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        return dense(self, "wo", hidden, d_model, ("mlp", "embed"), use_bias)


def dense(module, name, x, features, axes, use_bias, *, bias_name=None):
    """x [..., in] @ W [in, out] (+ b): float32 parameters of `module`, computed in x's dtype."""
    kernel = dense_kernel(module, name, (x.shape[-1], features), axes)
    y = precision.project("...i,io->...o", x, kernel, x.dtype)
    if use_bias:
        bias = module.param(bias_name or f"{name}_bias", nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
                            (features,))
        y = precision.add_bias(y, bias)
    return y


class Dense(nn.Module):
    """A dense layer as a submodule, with flax's parameter names ("kernel", "bias")."""

    features: int
    axes: tuple
    dtype: Any = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        return dense(self, "kernel", x.astype(self.dtype), self.features, self.axes, self.use_bias, bias_name="bias")


NORM_SCALE_INIT = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
NORM_BIAS_INIT = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
    """LayerNorm (Ba et al. 2016, the paper's choice) or RMSNorm (Zhang & Sennrich 2019), as `cfg` says."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(epsilon=cfg.norm_epsilon, dtype=cfg.compute_dtype, scale_init=NORM_SCALE_INIT, name=name)
    return LayerNorm(epsilon=cfg.norm_epsilon, dtype=cfg.compute_dtype, name=name)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, y = (x - mean) / sqrt(var + epsilon) * scale + bias, with the
    parameters ("scale", "bias": float32 [D]) and results of flax's `nn.LayerNorm`, statistics in
    float32 and the output in `dtype`; its gradient is written out (`layer_norm`)."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """[..., D] -> [..., D] in `dtype`."""
        features = (x.shape[-1],)
        scale = self.param("scale", NORM_SCALE_INIT, features)
        bias = self.param("bias", NORM_BIAS_INIT, features)
        return layer_norm(x, scale, bias, self.epsilon, jnp.dtype(self.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x, scale, bias, epsilon: float, dtype):
    """x [..., D] normalised over D, then scaled and shifted by float32 [D] `scale` and `bias`; in `dtype`.

    The gradient is the textbook one, dx = (g' - mean(g') - x^ mean(g' x^)) / sigma with g' = g * scale,
    computed in float32 from x (kept in its own dtype) and the per-row statistics: XLA's own
    gradient of the same expression materialises broadcasts of the statistics and parameters at
    the full [..., D] size (several passes per norm at d_model 128 on CPU).

    Every row sum, forward and backward, is of an expression of x and g alone (the variance as
    mean(x^2) - mean(x)^2, as flax's `use_fast_variance` computes it; mean(g' x^) from mean(g' x)),
    never of one that broadcasts another row sum back over D: XLA:CPU's YNNPACK fusions can run such
    chains of reductions several times slower (5x in attention's gradient, 2026-12-07). Here the norm
    alone ran 1.16-1.18x faster in two runs of three, the train step level within the noise.
    """
    return _layer_norm_forward(x, scale, bias, epsilon, dtype)[0]


def _normalised(x, mean, inv_std):
    return (x.astype(jnp.float32) - mean) * inv_std


def _layer_norm_forward(x, scale, bias, epsilon, dtype):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    variance = jnp.maximum(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) - jnp.square(mean), 0.0)
    inv_std = jax.lax.rsqrt(variance + epsilon)
    y = _normalised(x, mean, inv_std) * scale + bias
    return y.astype(dtype), (x, mean, inv_std, scale)


def _layer_norm_backward(epsilon, dtype, residuals, grad):
    del epsilon, dtype
    x, mean, inv_std, scale = residuals
    grad = grad.astype(jnp.float32)
    xf = x.astype(jnp.float32)
    scaled = grad * scale
    scaled_mean = jnp.mean(scaled, axis=-1, keepdims=True)
    # mean(g' x^) = (mean(g' x) - mean(x) mean(g')) / sigma
    scaled_normalised_mean = (jnp.mean(scaled * xf, axis=-1, keepdims=True) - mean * scaled_mean) * inv_std
    normalised = _normalised(xf, mean, inv_std)
    dx = inv_std * (scaled - scaled_mean - normalised * scaled_normalised_mean)
    leading = tuple(range(x.ndim - 1))
    return dx.astype(x.dtype), jnp.sum(grad * normalised, axis=leading), jnp.sum(grad, axis=leading)


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


def residual(cfg: ModelConfig, name: str, x, sublayer: Callable, deterministic: bool, *, memory=None):
    """Residual connection around `sublayer`, with dropout and post- or pre-normalisation.

    `memory` [B, M, D] (Transformer-XL): earlier states the sub-layer also reads, normalised as x is
    (pre-norm) and passed as its second argument; only x gets the residual and the output.
    """
    norm = make_norm(cfg, name=f"{name}_norm")
    dropout = Dropout(cfg.dropout_rate, name=f"{name}_dropout")
    if cfg.norm_position == "pre":
        out = sublayer(norm(x)) if memory is None else sublayer(norm(x), norm(memory))
        return x + dropout(out, deterministic=deterministic)
    out = sublayer(x) if memory is None else sublayer(x, memory)
    return norm(x + dropout(out, deterministic=deterministic))


def _attention(cfg: ModelConfig, name: str, use_rope: bool) -> MultiHeadAttention:
    # Reformer's LSH attention shares queries and keys, a self-attention device: encoder-decoder
    # attention in an "lsh" model is ordinary attention, with its own W^K.
    implementation = "fused" if cfg.attention == "lsh" and name == "cross_attention" else cfg.attention
    return MultiHeadAttention(
        num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_kv_heads=cfg.num_kv_heads,
        dropout_rate=cfg.attention_dropout_rate, implementation=implementation, chunk_size=cfg.attention_chunk_size,
        use_rope=use_rope, use_bias=cfg.attention_bias, lsh_num_hashes=cfg.lsh_num_hashes,
        lsh_bucket_size=cfg.lsh_bucket_size, dtype=cfg.compute_dtype, name=name)


def _feed_forward(cfg: ModelConfig) -> FeedForward:
    return FeedForward(d_ff=cfg.d_ff, activation=cfg.activation, dtype=cfg.compute_dtype, name="feed_forward")


class EncoderLayer(nn.Module):
    """Self-attention, then feed-forward (paper, Sec. 3.1, "Encoder")."""

    config: ModelConfig
    scanned: bool = False  # return (x, None), the carry/output pair nn.scan expects

    @nn.compact
    def __call__(self, x, mask, bias, positions, deterministic: bool):
        """x [B, S, D]; mask a masking.SegmentMask or [B, 1, S, S] bool; bias [B, N, S, S] or None;
        positions [B, S] -> [B, S, D]."""
        cfg = self.config
        self_attention = _attention(cfg, "self_attention", use_rope=cfg.position == "rope")
        x = residual(cfg, "self_attention", x, lambda h: self_attention(
            h, h, mask=mask, bias=bias, query_positions=positions, key_positions=positions,
            deterministic=deterministic), deterministic)
        x = residual(cfg, "feed_forward", x, _feed_forward(cfg), deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
    """Masked self-attention, encoder-decoder attention, feed-forward (paper, Sec. 3.1, "Decoder").

    With `cross_attention=False` (decoder-only language models) the middle sub-layer is absent.
    """

    config: ModelConfig
    cross_attention: bool = True
    scanned: bool = False

    @nn.compact
    def __call__(self, y, encoded, self_mask, self_bias, cross_mask, positions, decode_index,
                 deterministic: bool, decode: bool):
        """y [B, T, D]; encoded [B, S, D] or None; self_mask a masking.SegmentMask or [B, 1, T, T'] bool
        (T' = cache length when decoding); self_bias [B, N, T, T'] or None; cross_mask likewise [B, 1, T, S];
        positions [B, T] -> [B, T, D]."""
        cfg = self.config
        self_attention = _attention(cfg, "self_attention", use_rope=cfg.position == "rope")
        memory = self._memory(y) if cfg.memory_length and not decode else None

        def attend(h, h_memory=None):
            kv, key_positions = h, positions
            if h_memory is not None:  # Transformer-XL: keys and values over [memory; segment], [B, M + T, D]
                kv = jnp.concatenate([h_memory.astype(h.dtype), h], axis=1)
                key_positions = memory_lib.key_positions(positions, h_memory.shape[1])
            return self_attention(h, kv, mask=self_mask, bias=self_bias, query_positions=positions,
                                  key_positions=key_positions, deterministic=deterministic, decode=decode,
                                  decode_index=decode_index)

        y = residual(cfg, "self_attention", y, attend, deterministic, memory=memory)
        if self.cross_attention:
            cross_attention = _attention(cfg, "cross_attention", use_rope=False)
            y = residual(cfg, "cross_attention", y, lambda h: cross_attention(
                h, encoded, mask=cross_mask, deterministic=deterministic, decode=decode, static_kv=True),
                deterministic)
        y = residual(cfg, "feed_forward", y, _feed_forward(cfg), deterministic)
        y = nn.with_logical_constraint(y, ("batch", "length", "embed"))
        return (y, None) if self.scanned else y

    def _memory(self, y):
        """Transformer-XL: this layer's inputs at the last M positions before the segment, [B, M, D]
        under stop-gradient (`transformer.memory`); None when the call carries no memory. With the
        "memory" collection mutable, replaced by the last M positions of [memory; y]."""
        if not (self.has_variable("memory", "hidden") or self.is_mutable_collection("memory")):
            return None
        batch, _, d_model = y.shape
        hidden = self.variable("memory", "hidden", nn.with_logical_partitioning(jnp.zeros, memory_lib.AXES),
                               (batch, self.config.memory_length, d_model), y.dtype)
        memory = jax.lax.stop_gradient(hidden.value)
        if self.is_mutable_collection("memory") and not self.is_initializing():
            hidden.value = memory_lib.extend(memory, jax.lax.stop_gradient(y))
        return memory
