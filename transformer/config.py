"""Model hyperparameters: one frozen, validated dataclass for the whole Transformer family.

Presets follow Vaswani et al. (2017), Table 3. The trainer converts its ml_collections config into a
`ModelConfig` once, at the boundary; modules below the model level take plain sizes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

ATTENTION_KINDS = ("reference", "fused", "chunked", "splash")
POSITION_KINDS = ("sinusoidal", "learned", "rope", "relative", "alibi")
ACTIVATIONS = ("relu", "gelu", "silu", "swiglu")
LENGTH_PENALTIES = ("gnmt", "power")  # beam search's forms (transformer.decoding.length_penalty)
NORM_KINDS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("post", "pre")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a Transformer. Names follow the paper where it has one."""

    vocab_size: int = 32_000
    d_model: int = 512  # width of every residual stream (paper: d_model)
    d_ff: int = 2048  # inner width of the position-wise feed-forward network (paper: d_ff)
    num_heads: int = 8  # query heads (paper: h)
    num_kv_heads: int | None = None  # key/value heads; None = num_heads; fewer = grouped-query attention
    num_encoder_layers: int = 6  # paper: N
    num_decoder_layers: int = 6
    dropout_rate: float = 0.1  # on sub-layer outputs and embedding sums (paper: P_drop)
    attention_dropout_rate: float = 0.0  # on attention weights (not in the paper; tensor2tensor's option)
    max_len: int = 512  # longest sequence; sizes the learned position table and decoding caches
    position: str = "sinusoidal"  # one of POSITION_KINDS
    attention: str = "fused"  # one of ATTENTION_KINDS: which dot_product_attention kernel to use
    attention_chunk_size: int = 128  # key block length of the "chunked" kernel
    sliding_window: int | None = None  # local self-attention: attend only to keys with |i - j| < window
    activation: str = "relu"  # one of ACTIVATIONS (paper: ReLU; gelu is the tanh approximation)
    norm: str = "layernorm"  # one of NORM_KINDS
    norm_epsilon: float = 1e-6  # added to the variance in every norm (PyTorch's and Marian's default: 1e-5)
    attention_bias: bool = False  # biases on the Q, K, V and output projections (the paper's are unbiased)
    norm_position: str = "post"  # "post" = paper (LayerNorm(x + Sublayer(x))); "pre" = x + Sublayer(LayerNorm(x))
    share_embeddings: bool = True  # one embedding matrix for source and target tokens (paper, Sec. 3.4)
    tie_output: bool = True  # pre-softmax projection = transposed target embedding (paper, Sec. 3.4)
    relative_num_buckets: int = 32  # T5 relative position buckets
    relative_max_distance: int = 128  # T5: distances beyond this share the last bucket
    dtype: str = "float32"  # compute dtype; parameters are always float32
    scan_layers: bool = False  # nn.scan over identical layers: one compiled layer, faster compiles
    remat: bool = False  # rematerialise each layer in the backward pass: less memory, ~1/3 more compute
    # Training and evaluation losses: 0 = from the whole [B, T, V] logits; N > 0 = the output
    # projection and the loss fused, N positions at a time (losses.projected_token_statistics).
    loss_block_tokens: int = 0

    def __post_init__(self):
        _check_positive(self, "vocab_size", "d_model", "d_ff", "num_heads", "max_len", "attention_chunk_size")
        _check_non_negative(self, "num_encoder_layers", "num_decoder_layers")
        if self.d_model % self.num_heads:
            raise ValueError(
                    f"ModelConfig.d_model={self.d_model} is not divisible by num_heads={self.num_heads}: "
                    "choose num_heads that divides d_model (the paper: d_model 512, 8 heads, d_k = 64).")
        if self.num_kv_heads is not None:
            if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
                raise ValueError(
                        f"ModelConfig.num_kv_heads={self.num_kv_heads} must be a positive divisor of "
                        f"num_heads={self.num_heads} (or None for ordinary multi-head attention).")
        _check_non_negative(self, "loss_block_tokens")
        for name in ("dropout_rate", "attention_dropout_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ModelConfig.{name}={value} is outside [0, 1): use e.g. 0.1 (0 disables dropout).")
        _check_choice(self, "position", POSITION_KINDS)
        _check_choice(self, "attention", ATTENTION_KINDS)
        _check_choice(self, "activation", ACTIVATIONS)
        if not self.norm_epsilon > 0.0:
            raise ValueError(f"ModelConfig.norm_epsilon={self.norm_epsilon} must be positive (e.g. 1e-6).")
        _check_choice(self, "norm", NORM_KINDS)
        _check_choice(self, "norm_position", NORM_POSITIONS)
        _check_choice(self, "dtype", tuple(DTYPES))
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(
                    f"ModelConfig.position='rope' needs an even head dimension, got d_model/num_heads = {self.head_dim}: "
                    "change d_model or num_heads.")
        if self.attention == "splash" and (self.position in ("relative", "alibi") or self.attention_dropout_rate):
            raise ValueError(
                    "ModelConfig.attention='splash' (the Pallas TPU kernel) takes no attention bias and no attention "
                    f"dropout, but position={self.position!r}, attention_dropout_rate={self.attention_dropout_rate}: "
                    "use attention='fused' (which picks splash on TPU where it applies).")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"ModelConfig.sliding_window={self.sliding_window} must be positive or None (global attention).")

    @property
    def head_dim(self) -> int:
        """d_k = d_v = d_model / h (paper, Sec. 3.2.2)."""
        return self.d_model // self.num_heads

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    def replace(self, **overrides) -> "ModelConfig":
        return dataclasses.replace(self, **overrides)

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named preset ("tiny", "base", "big") with keyword overrides, e.g. `preset("base", vocab_size=37000)`."""
        if name not in PRESETS:
            raise ValueError(f"Unknown ModelConfig preset {name!r}: choose one of {sorted(PRESETS)}.")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"Unknown ModelConfig field(s) {unknown}: valid fields are {sorted(fields)}.")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
        # A few-second-compile model for tests and smoke runs.
        "tiny": dict(d_model=64, d_ff=128, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.1),
        # Paper, Table 3, "base": 65M parameters at a 37k shared vocabulary.
        "base": dict(d_model=512, d_ff=2048, num_heads=8, num_encoder_layers=6, num_decoder_layers=6, dropout_rate=0.1),
        # Paper, Table 3, "big": 213M parameters.
        "big": dict(d_model=1024, d_ff=4096, num_heads=16, num_encoder_layers=6, num_decoder_layers=6, dropout_rate=0.3),
}


def _check_positive(cfg, *names):
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"ModelConfig.{name}={value!r} must be a positive integer.")


def _check_non_negative(cfg, *names):
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"ModelConfig.{name}={value!r} must be a non-negative integer.")


def _check_choice(cfg, name, choices):
    value = getattr(cfg, name)
    if value not in choices:
        raise ValueError(f"ModelConfig.{name}={value!r} is not one of {list(choices)}.")
