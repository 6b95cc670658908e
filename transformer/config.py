"""Model hyperparameters: one frozen, validated dataclass for the whole Transformer family.

Presets follow Vaswani et al. (2017), Table 3. The trainer converts its ml_collections config into a
`ModelConfig` once, at the boundary; modules below the model level take plain sizes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from transformer import runtime

ATTENTION_KINDS = ("reference", "fused", "chunked", "splash", "banded", "lsh")
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
    # Longformer (Beltagy et al. 2020). With attention="banded" the window is computed band by band,
    # O(T * window) rather than a masked T x T matrix.
    sliding_window_dilation: int = 1  # d: keys with |i - j| < window * d and (i - j) % d == 0
    # Global tokens (a [B, S] bool `global_mask` model call argument) attend to and are attended by every
    # position; at most this many per row (static slots), a row's later ones acting as local tokens.
    max_global_tokens: int = 0
    # Reformer (Kitaev et al. 2020): attention="lsh" is shared-QK locality-sensitive-hashing attention.
    lsh_num_hashes: int = 2  # hash rounds
    lsh_bucket_size: int = 64  # queries per sorted chunk; each chunk attends to itself and the one before
    reversible: bool = False  # reversible residual layers: activations recomputed in the backward pass
    # Transformer-XL (Dai et al. 2019): DecoderOnly keeps each layer's last `memory_length` hidden
    # states of the previous segment (stop-gradient) as extra keys and values. 0 = no memory.
    memory_length: int = 0
    activation: str = "relu"  # one of ACTIVATIONS (paper: ReLU; gelu is the tanh approximation)
    norm: str = "layernorm"  # one of NORM_KINDS
    norm_epsilon: float = 1e-6  # added to the variance in every norm (PyTorch's and Marian's default: 1e-5)
    attention_bias: bool = False  # biases on the Q, K, V and output projections (the paper's are unbiased)
    norm_position: str = "post"  # "post" = paper (LayerNorm(x + Sublayer(x))); "pre" = x + Sublayer(LayerNorm(x))
    share_embeddings: bool = True  # one embedding matrix for source and target tokens (paper, Sec. 3.4)
    tie_output: bool = True  # pre-softmax projection = transposed target embedding (paper, Sec. 3.4)
    relative_num_buckets: int = 32  # T5 relative position buckets
    relative_max_distance: int = 128  # T5: distances beyond this share the last bucket
    # Compute dtype (parameters are always float32): one of DTYPES, or "auto": bfloat16 where it is
    # fast (TPU, GPU, CPUs with AMX or AVX-512 BF16), else float32 (runtime.fast_compute_dtype).
    dtype: str = "float32"
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
        _check_choice(self, "dtype", (*DTYPES, "auto"))
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
        _check_positive(self, "sliding_window_dilation", "lsh_num_hashes", "lsh_bucket_size")
        _check_non_negative(self, "max_global_tokens", "memory_length")
        # Longformer (banded) checks.
        if self.attention == "banded" and self.sliding_window is None:
            raise ValueError("ModelConfig.attention='banded' computes a sliding window band by band and needs "
                             "sliding_window (e.g. 256); for attention over all keys use 'fused' or 'chunked'.")
        if self.attention == "banded" and self.position in ("relative", "alibi"):
            raise ValueError(f"ModelConfig.attention='banded' takes no attention bias, but position={self.position!r} "
                             "adds a dense [T, S] one: use position='rope', 'sinusoidal' or 'learned' (or "
                             "attention='chunked' with the sliding_window).")
        for name, value in (("sliding_window_dilation", self.sliding_window_dilation > 1),
                            ("max_global_tokens", self.max_global_tokens > 0)):
            if value and self.sliding_window is None:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)} shapes a sliding window, but "
                                 "sliding_window=None (every token already attends everywhere): set a sliding_window "
                                 f"or leave {name} at its default.")
            if value and self.attention == "splash":
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)}: attention='splash' reads no dilation or "
                                 "global tokens; use attention='banded' (or 'fused', which takes the dense mask).")
        if self.sliding_window_dilation > 1 and self.memory_length:
            raise ValueError(f"ModelConfig.sliding_window_dilation={self.sliding_window_dilation} cannot be combined "
                             f"with memory_length={self.memory_length} (the Transformer-XL mask has no dilation): "
                             "set sliding_window_dilation=1.")
        # Reformer (lsh, reversible) checks.
        if self.attention == "lsh":
            where = "ModelConfig.attention='lsh' (Reformer's shared-QK LSH self-attention)"
            if self.position in ("relative", "alibi"):
                raise ValueError(f"{where} takes no attention bias, but position={self.position!r} adds a dense [T, S] "
                                 "one: use position='rope', 'sinusoidal' or 'learned'.")
            if self.num_kv_heads not in (None, self.num_heads):
                raise ValueError(f"{where} uses each query head as its own key head, so num_kv_heads="
                                 f"{self.num_kv_heads} (grouped-query attention) does not apply: "
                                 "set num_kv_heads=None.")
            if self.sliding_window is not None or self.max_global_tokens:
                raise ValueError(f"{where} picks its keys by hashing and reads no sliding window or global tokens "
                                 f"(sliding_window={self.sliding_window}, max_global_tokens={self.max_global_tokens}): "
                                 "set sliding_window=None and max_global_tokens=0, or use attention='banded'.")
        if self.reversible:
            where = "ModelConfig.reversible=True (RevNet layers y1 = x1 + F(x2), y2 = x2 + G(y1))"
            if self.norm_position != "pre":
                raise ValueError(f"{where} needs pre-norm residual functions; norm_position={self.norm_position!r} "
                                 "normalises the residual sum, which cannot be inverted: set norm_position='pre'.")
            if self.scan_layers or self.remat:
                raise ValueError(f"{where} runs its own loop over the layers and already recomputes them in the "
                                 f"backward pass (scan_layers={self.scan_layers}, remat={self.remat}): set "
                                 "scan_layers=False and remat=False.")
        # Transformer-XL (memory) checks.
        if self.memory_length:
            where = f"ModelConfig.memory_length={self.memory_length} (Transformer-XL memory)"
            if self.position in ("sinusoidal", "learned"):
                raise ValueError(
                        f"{where} needs relative positions, but position={self.position!r} is absolute: the same "
                        "absolute position would recur in every segment. Use position='rope', 'relative' or 'alibi'.")
            if self.attention in ("splash", "banded", "lsh"):
                raise ValueError(
                        f"{where} attends over [memory; segment] with a dense mask, which attention="
                        f"{self.attention!r} cannot take: use attention='fused', 'reference' or 'chunked'.")
            if self.reversible:
                raise ValueError(f"{where} cannot be combined with reversible=True (a reversible layer recomputes "
                                 "its input from its output, the memory would be read twice): set one of them off.")
            if self.max_global_tokens:
                raise ValueError(f"{where} cannot be combined with Longformer global tokens (max_global_tokens="
                                 f"{self.max_global_tokens}): set max_global_tokens=0.")

    @property
    def head_dim(self) -> int:
        """d_k = d_v = d_model / h (paper, Sec. 3.2.2)."""
        return self.d_model // self.num_heads

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.resolved_dtype()]

    def resolved_dtype(self, platform: str | None = None) -> str:
        """`dtype`, with "auto" resolved for `platform` (default: the platform of the computation being
        traced, else JAX's default backend)."""
        if self.dtype != "auto":
            return self.dtype
        return runtime.fast_compute_dtype(platform or runtime.trace_platform())

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
