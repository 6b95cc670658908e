"""The Transformer family: EncoderDecoder (translation), DecoderOnly (LM), EncoderOnly (BERT-style).

All three share one embedding, one `Encoder` stack and one `Decoder` stack. Token id PAD_ID (0, see
`transformer.tokens`) is padding and the decoder's BOS.
Packed rows are described by `*_segment_ids` (1, 2, ... per sequence, 0 on padding) and
`*_positions` (restarting at 0 in each sequence); both default to a single unpacked sequence.

Dropout is on when the call is given a 'dropout' rng (`rngs={'dropout': key}`) and off otherwise,
unless `deterministic` says so explicitly.

Decoding with a cache (see `transformer.decoding`): run `decode(..., decode=True)` once in `init`
on full-length decoder inputs to size the cache, then call it with one (or a few) new tokens at a
time and `mutable=['cache']`; the cache tracks the position.

Transformer-XL (DecoderOnly with `memory_length > 0`, see `transformer.memory`): applied with a
"memory" collection (and `mutable=['memory']` to move it on), each segment also attends to every
layer's states over the previous segments. Without that collection the model reads no memory.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from transformer import masking, memory as memory_lib, positional, precision, reformer
from transformer.config import ModelConfig
from transformer.dropout import Dropout
from transformer.layers import DecoderLayer, Dense, EncoderLayer, make_norm
from transformer.tokens import PAD_ID


def shift_right(targets, segment_ids=None):
    """Decoder inputs from targets: [B, T] -> [B, T], PAD_ID (the BOS) at the start of every sequence.

    Position t of the output holds target t-1, so the decoder predicts target t from targets < t.
    """
    shifted = jnp.pad(targets, ((0, 0), (1, 0)), constant_values=PAD_ID)[:, :-1]
    if segment_ids is not None:  # packed rows: each sequence starts with BOS, not the previous one's end
        shifted = jnp.where(segment_ids == jnp.pad(segment_ids, ((0, 0), (1, 0)))[:, :-1], shifted, PAD_ID)
    return shifted


class Embed(nn.Module):
    """Token embedding [V, D], scaled by sqrt(d_model) (paper, Sec. 3.4), and its transpose for logits."""

    vocab_size: int
    d_model: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        # std d_model^-0.5, so that scaled embeddings have unit variance.
        init = nn.initializers.normal(stddev=self.d_model**-0.5)
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(init, ("vocab", "embed")), (self.vocab_size, self.d_model))

    def __call__(self, ids):
        """[B, T] int -> [B, T, D]."""
        x = jnp.take(self.embedding, ids, axis=0) * jnp.sqrt(jnp.float32(self.d_model))
        return x.astype(self.dtype)

    def attend(self, x):
        """Pre-softmax projection with the shared weights: [B, T, D] -> logits [B, T, V]."""
        return precision.einsum("BTD,VD->BTV", x, self.embedding, x.dtype, out_dtype=jnp.float32)


def _default_positions(tokens, positions):
    if positions is not None:
        return positions
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def _add_absolute_positions(cfg: ModelConfig, x, positions, deterministic):
    """Adds sinusoidal or learned position encodings (if configured), then dropout (paper, Sec. 5.4)."""
    if cfg.position == "sinusoidal":
        x = x + positional.sinusoidal(positions, cfg.d_model).astype(x.dtype)
    elif cfg.position == "learned":
        if x.shape[1] > cfg.max_len:
            raise ValueError(f"Sequence length {x.shape[1]} exceeds ModelConfig.max_len={cfg.max_len}, the size "
                             "of the learned position table: raise max_len or shorten the input.")
        x = x + positional.LearnedPositionEmbedding(cfg.max_len, cfg.d_model, name="position_embedding")(
            positions).astype(x.dtype)
    x = Dropout(cfg.dropout_rate, name="embedding_dropout")(x, deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def _key_segments(valid, segment_ids):
    """[B, S] segment ids with padding as 0 (what `masking.SegmentMask` never attends to)."""
    if segment_ids is None:
        return valid.astype(jnp.int32)
    return jnp.where(valid, segment_ids, 0).astype(jnp.int32)


def _global_tokens(cfg: ModelConfig, global_mask, segments):
    """`masking.SegmentMask` fields for Longformer's global tokens (global_mask [B, S] bool, True =
    global; None = none). Padding (segment 0) takes no slot; a row's tokens past the first
    `cfg.max_global_tokens` act as ordinary (local) tokens, in every attention kernel alike."""
    if global_mask is None:
        return {}
    if not cfg.max_global_tokens:
        raise ValueError("A global_mask (Longformer global tokens) needs ModelConfig.max_global_tokens > 0, the "
                         "number of global slots per row, and a sliding_window.")
    global_tokens = jnp.asarray(global_mask, bool)
    if segments is not None:
        global_tokens = global_tokens & (segments != 0)
    return dict(global_tokens=global_tokens, max_global_tokens=cfg.max_global_tokens)


def _position_bias(cfg: ModelConfig, query_positions, key_positions, bidirectional: bool):
    """The [B, N, T, S] attention bias of relative schemes (shared by all layers), else None."""
    if cfg.position == "relative":
        return positional.RelativePositionBias(
            cfg.num_heads, cfg.relative_num_buckets, cfg.relative_max_distance, bidirectional,
            name="relative_position_bias")(query_positions, key_positions)
    if cfg.position == "alibi":
        return positional.alibi_bias(query_positions, key_positions, cfg.num_heads)
    return None


def _apply_layers(cfg: ModelConfig, layer_cls, num_layers: int, x, args, num_static: int, **layer_kwargs):
    """Runs `num_layers` layers: a Python loop, or one `nn.scan`ned layer; optionally rematerialised.

    `args` are the per-call arguments after x (shared by every layer), of which the last
    `num_static` are Python values (mode flags). With `cfg.reversible`, Reformer's reversible
    residual stack (`transformer.reformer`) instead.
    """
    if cfg.reversible:
        return reformer.reversible_layers(cfg, layer_cls, num_layers, x, args, **layer_kwargs)
    if cfg.remat:
        # NOTE: flax counts static_argnums from `self` (0), then x (1), then args.
        num_args = 2 + len(args)
        layer_cls = nn.remat(layer_cls, prevent_cse=not cfg.scan_layers,
                             static_argnums=tuple(range(num_args - num_static, num_args)))
    if not cfg.scan_layers:
        for i in range(num_layers):
            x = layer_cls(cfg, name=f"layer_{i}", **layer_kwargs)(x, *args)
        return x
    scanned = nn.scan(
        layer_cls,
        variable_axes={"params": 0, "cache": 0, "intermediates": 0, "memory": 0},  # maps, memory stacked [L, ...]
        split_rngs={"params": True, "dropout": True, "lsh": True},  # each layer its own LSH rotations
        in_axes=(nn.broadcast,) * len(args),
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x, _ = scanned(cfg, scanned=True, name="layers", **layer_kwargs)(x, *args)
    return x


class Encoder(nn.Module):
    """A stack of `EncoderLayer`s over embedded tokens (paper, Fig. 1, left)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, valid, segment_ids, positions, *, deterministic: bool, global_mask=None):
        """x [B, S, D] embedded tokens; valid [B, S] bool; segment_ids, positions [B, S]; global_mask
        [B, S] bool or None (Longformer global tokens) -> [B, S, D]."""
        cfg = self.config
        x = _add_absolute_positions(cfg, x, positions, deterministic)
        segments = _key_segments(valid, segment_ids)
        mask = masking.SegmentMask(segments, segments, window=cfg.sliding_window, dilation=cfg.sliding_window_dilation,
                                   **_global_tokens(cfg, global_mask, segments))
        bias = _position_bias(cfg, positions, positions, bidirectional=True)
        x = _apply_layers(cfg, EncoderLayer, cfg.num_encoder_layers, x, (mask, bias, positions, deterministic), 1)
        if cfg.norm_position == "pre":
            x = make_norm(cfg, name="final_norm")(x)
        return x


class Decoder(nn.Module):
    """A stack of `DecoderLayer`s (paper, Fig. 1, right), with or without encoder-decoder attention."""

    config: ModelConfig
    cross_attention: bool = True

    @nn.compact
    def __call__(self, y, segment_ids, positions, encoded=None, encoder_valid=None,
                 encoder_segment_ids=None, *, deterministic: bool, decode: bool = False, global_mask=None):
        """y [B, T, D] embedded decoder inputs; segment_ids, positions [B, T]; encoded [B, S, D];
        encoder_valid, encoder_segment_ids [B, S] -> [B, T, D].

        NOTE: self-attention has no padding mask: with right padding the causal mask already keeps
        real queries off padded keys, and leaving it out keeps logits[:, t] a function of
        decoder_inputs[:, :t+1] alone (packed rows are separated by their segment ids).
        """
        cfg = self.config
        batch, length = y.shape[:2]
        decode_index = None
        memory_valid = self._memory_valid(batch, length, segment_ids) if cfg.memory_length and not decode else None
        if decode:
            query_index, key_index, decode_index = self._advance_cache(length)
        else:
            query_index = key_index = jnp.arange(length)
        if positions is None:
            positions = jnp.broadcast_to(query_index, (batch, length))
            if memory_valid is not None:
                positions = positions + memory_valid.shape[1]  # the memory's keys take 0, ..., M - 1
        key_positions = positions if not decode else jnp.broadcast_to(key_index, (batch, key_index.shape[0]))

        y = _add_absolute_positions(cfg, y, positions, deterministic)
        if decode and global_mask is not None:
            raise ValueError("global_mask (Longformer global tokens) is for whole sequences: a decoding step "
                             "with a cache does not know which cached keys were global. Decode without it.")
        global_tokens = _global_tokens(cfg, global_mask, segment_ids)
        if memory_valid is not None:  # Transformer-XL: keys over [memory; segment], [B, M + T]
            self_mask = memory_lib.attention_mask(memory_valid, length, cfg.sliding_window)
            key_positions = memory_lib.key_positions(positions, memory_valid.shape[1])
        else:
            self_mask = masking.SegmentMask(
                segment_ids, segment_ids, query_index=query_index if decode else None,
                key_index=key_index if decode else None, causal=True, window=cfg.sliding_window,
                dilation=cfg.sliding_window_dilation, **global_tokens)
        self_bias = _position_bias(cfg, positions, key_positions, bidirectional=False)
        cross_mask = None
        if self.cross_attention:
            packed = segment_ids is not None and encoder_segment_ids is not None
            cross_mask = masking.SegmentMask(segment_ids if packed else None,
                                             _key_segments(encoder_valid, encoder_segment_ids if packed else None))
        args = (encoded, self_mask, self_bias, cross_mask, positions, decode_index, deterministic, decode)
        y = _apply_layers(cfg, DecoderLayer, cfg.num_decoder_layers, y, args, 2,
                          cross_attention=self.cross_attention)
        if cfg.norm_position == "pre":
            y = make_norm(cfg, name="final_norm")(y)
        return y

    def _memory_valid(self, batch, length, segment_ids):
        """Transformer-XL: which memory slots hold a state, [B, M] bool; None when the call carries no
        memory (no "memory" variables given, none to create). With the collection mutable, the flags
        move on by `length` valid positions, as each layer's states do (`DecoderLayer._memory`)."""
        if not (self.has_variable("memory", "valid") or self.is_mutable_collection("memory")):
            return None
        if segment_ids is not None:
            raise ValueError("A Transformer-XL memory (ModelConfig.memory_length > 0) carries one stream per row: "
                             "packed rows (segment_ids) cannot use it. Feed unpacked stream segments "
                             "(data.batching='stream').")
        valid = self.variable("memory", "valid", nn.with_logical_partitioning(jnp.zeros, ("batch", "length")),
                              (batch, self.config.memory_length), jnp.bool_)
        current = valid.value
        if self.is_mutable_collection("memory") and not self.is_initializing():
            valid.value = memory_lib.extend(current, jnp.ones((batch, length), jnp.bool_))
        return current

    def _advance_cache(self, length):
        """Decoding: query indices [T], cache key indices [S], and the write index; advances the index.

        The first call (in `init`) sizes the cache to `length` and leaves the index at 0.
        """
        initialized = self.has_variable("cache", "index")
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        key_index = self.variable("cache", "key_index", lambda: jnp.arange(length, dtype=jnp.int32))
        if not initialized:
            return jnp.arange(length), key_index.value, 0
        start = index.value
        index.value = start + length
        return start + jnp.arange(length), key_index.value, start


def _refuse_memory(cfg: ModelConfig, model_name: str):
    if cfg.memory_length:
        raise ValueError(f"ModelConfig.memory_length={cfg.memory_length}: the Transformer-XL memory is for "
                         f"DecoderOnly (objective 'lm'), not {model_name}: set memory_length=0.")


class _Model(nn.Module):
    config: ModelConfig

    def _deterministic(self, deterministic):
        return (not self.has_rng("dropout")) if deterministic is None else deterministic

    def _embed(self, name):
        cfg = self.config
        return Embed(cfg.vocab_size, cfg.d_model, cfg.compute_dtype, name=name)

    def _output_projection(self):
        """The untied pre-softmax projection [D, V]; None when tied to the embedding (paper, Sec. 3.4)."""
        cfg = self.config
        if cfg.tie_output:
            return None
        return Dense(cfg.vocab_size, ("embed", "vocab"), cfg.compute_dtype, use_bias=False, name="logits")

    def _logits(self, embed: Embed, y, features: bool = False):
        """[B, T, D] -> logits [B, T, V] float32; with `features`, (y, the projection [V, D]) instead,
        for a loss that applies the projection itself (`losses.projected_token_statistics`)."""
        if features:
            if self.output_projection is None:
                return y, embed.embedding
            return y, nn.meta.unbox(self.output_projection.variables["params"]["kernel"]).T
        logits = embed.attend(y) if self.output_projection is None else self.output_projection(y)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.float32)


class EncoderDecoder(_Model):
    """The paper's Transformer for sequence-to-sequence tasks such as translation."""

    def setup(self):
        cfg = self.config
        _refuse_memory(cfg, "EncoderDecoder")
        self.source_embedding = self._embed("embedding" if cfg.share_embeddings else "source_embedding")
        self.target_embedding = self.source_embedding if cfg.share_embeddings else self._embed("target_embedding")
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg, cross_attention=True)
        self.output_projection = self._output_projection()

    def __call__(self, inputs, targets, *, inputs_segment_ids=None, targets_segment_ids=None,
                 inputs_positions=None, targets_positions=None, deterministic: bool | None = None,
                 features: bool = False, global_mask=None):
        """inputs [B, S], targets [B, T] int -> logits [B, T, V] float32.

        logits[:, t] predicts targets[:, t] from targets[:, :t] and all of inputs. `features=True`:
        (the last hidden states [B, T, D], the output projection [V, D]) instead of the logits.
        `global_mask` [B, S] bool: Longformer global tokens of the inputs (encoder self-attention).
        """
        deterministic = self._deterministic(deterministic)
        encoded = self.encode(inputs, segment_ids=inputs_segment_ids, positions=inputs_positions,
                              deterministic=deterministic, global_mask=global_mask)
        return self.decode(encoded, inputs, shift_right(targets, targets_segment_ids),
                           inputs_segment_ids=inputs_segment_ids, targets_segment_ids=targets_segment_ids,
                           targets_positions=targets_positions, deterministic=deterministic, features=features)

    def encode(self, inputs, *, segment_ids=None, positions=None, deterministic: bool | None = None,
               global_mask=None):
        """inputs [B, S] int (global_mask [B, S] bool: Longformer global tokens) -> encoded [B, S, D]."""
        deterministic = self._deterministic(deterministic)
        positions = _default_positions(inputs, positions)
        return self.encoder(self.source_embedding(inputs), inputs != PAD_ID, segment_ids, positions,
                            deterministic=deterministic, global_mask=global_mask)

    def decode(self, encoded, inputs, decoder_inputs, *, inputs_segment_ids=None,
               targets_segment_ids=None, targets_positions=None, deterministic: bool | None = None,
               decode: bool = False, features: bool = False):
        """encoded [B, S, D], inputs [B, S] (for its padding), decoder_inputs [B, T] -> logits [B, T, V].

        `decoder_inputs` are already shifted (BOS = PAD_ID first).
        """
        deterministic = self._deterministic(deterministic)
        y = self.decoder(self.target_embedding(decoder_inputs), targets_segment_ids, targets_positions,
                         encoded, inputs != PAD_ID, inputs_segment_ids, deterministic=deterministic, decode=decode)
        return self._logits(self.target_embedding, y, features)


class DecoderOnly(_Model):
    """A causal language model: the paper's decoder without encoder-decoder attention."""

    def setup(self):
        self.embedding = self._embed("embedding")
        self.decoder = Decoder(self.config, cross_attention=False)
        self.output_projection = self._output_projection()

    def __call__(self, targets, *, inputs=None, segment_ids=None, positions=None, deterministic: bool | None = None,
                 features: bool = False, global_mask=None):
        """targets [B, T] int -> logits [B, T, V]; logits[:, t] predicts targets[:, t] from targets[:, :t].
        `features=True`: (hidden states [B, T, D], output projection [V, D]) instead.

        `inputs` [B, T]: the decoder inputs, already shifted (default `shift_right(targets)`), for a
        segment of a stream, whose first input is the previous segment's last target, not BOS.
        With memory_length > 0 and a "memory" collection (`transformer.memory`), the segment also
        attends to the previous segments' states.
        `global_mask` [B, T] bool: Longformer global tokens, by position of the decoder inputs; a global
        token attends to every earlier position and every later one attends to it (causal)."""
        decoder_inputs = shift_right(targets, segment_ids) if inputs is None else inputs
        return self.decode(decoder_inputs, segment_ids=segment_ids,
                           positions=positions, deterministic=deterministic, features=features,
                           global_mask=global_mask)

    def decode(self, decoder_inputs, *, segment_ids=None, positions=None,
               deterministic: bool | None = None, decode: bool = False, features: bool = False, global_mask=None):
        """decoder_inputs [B, T] (already shifted) -> logits [B, T, V]. `global_mask` as in `__call__`
        (whole sequences only, not with `decode`)."""
        deterministic = self._deterministic(deterministic)
        y = self.decoder(self.embedding(decoder_inputs), segment_ids, positions,
                         deterministic=deterministic, decode=decode, global_mask=global_mask)
        return self._logits(self.embedding, y, features)


class EncoderOnly(_Model):
    """A BERT-style bidirectional encoder with a per-token head (masked LM) or a pooled head.

    `num_classes=None`: logits [B, S, V] over the vocabulary for every token.
    `num_classes=C`: logits [B, C] from the first token's state through a tanh pooler (BERT's [CLS]).
    """

    num_classes: int | None = None

    def setup(self):
        cfg = self.config
        _refuse_memory(cfg, "EncoderOnly")
        self.embedding = self._embed("embedding")
        self.encoder = Encoder(cfg)
        if self.num_classes is None:
            self.output_projection = self._output_projection()
        else:
            self.pooler = Dense(cfg.d_model, ("embed", "mlp"), cfg.compute_dtype, name="pooler")
            self.classifier = Dense(self.num_classes, ("mlp", None), cfg.compute_dtype, name="classifier")

    def __call__(self, inputs, *, segment_ids=None, positions=None, deterministic: bool | None = None,
                 features: bool = False, global_mask=None):
        """inputs [B, S] int -> logits [B, S, V], or [B, C] with a pooled head. `features=True` (token
        head only): (hidden states [B, S, D], output projection [V, D]) instead. `global_mask` [B, S]
        bool: Longformer global tokens (e.g. the [CLS] token), attending and attended everywhere."""
        deterministic = self._deterministic(deterministic)
        positions = _default_positions(inputs, positions)
        x = self.encoder(self.embedding(inputs), inputs != PAD_ID, segment_ids, positions,
                         deterministic=deterministic, global_mask=global_mask)
        if self.num_classes is None:
            return self._logits(self.embedding, x, features)
        if features:
            raise ValueError("features=True needs the per-token vocabulary head (num_classes=None).")
        pooled = jnp.tanh(self.pooler(x[:, 0]))  # [B, D], the first token's state
        return self.classifier(pooled).astype(jnp.float32)
