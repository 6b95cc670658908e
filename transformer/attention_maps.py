"""Attention maps: the attention weights of one teacher-forced forward pass, drawn as heatmaps.

    weights = attention_maps.collect(model, params, inputs, targets)   # an EncoderDecoder's
    weights["encoder"], weights["decoder"], weights["cross"]   # [L, B, N, S, S], [L, B, N, T, T], [L, B, N, T, S]

`collect` applies the model with `mutable=["intermediates"]`, under which every MultiHeadAttention
sows its weights (`attention.attention_weights`); an ordinary `apply` computes none of them.
`write_report` does that for one example of a trained run (translating the source first) and
writes a heatmap per layer and kind, a head-averaged alignment, and an index.html that shows them.
L is the layer axis; the other letters are those of `transformer.attention`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from transformer import decoding, evaluation, plots
from transformer.tokens import EOS_ID, PAD_ID

# The attention kinds a model may have, in the order reports show them.
KINDS = {"encoder": "Encoder self-attention", "decoder": "Decoder self-attention",
         "cross": "Encoder-decoder (cross) attention"}
BOS = "<s>"  # the label of the decoder's start symbol (PAD_ID shifted in, see `models.shift_right`)


def collect(model, params, *args, method=None, **kwargs) -> dict[str, jax.Array]:
    """`model.apply({"params": params}, *args, **kwargs)`'s attention weights by kind: {kind: [L, B, N, T, S]}.

    Kinds are the keys of KINDS that the model has; weights are float32, 0 on masked keys.
    """
    _, variables = model.apply({"params": params}, *args, method=method, mutable=["intermediates"], **kwargs)
    return by_kind(variables.get("intermediates", {}))


def by_kind(intermediates) -> dict[str, jax.Array]:
    """The sown `attention_weights` of an intermediates collection, stacked over layers: {kind: [L, ...]}."""
    layers: dict[str, list] = {}
    for path, (weights,) in traverse_util.flatten_dict(intermediates).items():
        if path[-1] != "attention_weights":
            continue
        # path: (encoder | decoder, layer_<i> | layers, self_attention | cross_attention, attention_weights)
        kind = "encoder" if path[0] == "encoder" else "cross" if path[-2] == "cross_attention" else "decoder"
        scanned = path[-3] == "layers"  # nn.scan stacked the layers already: [L, B, N, T, S]
        index = 0 if scanned else int(path[-3].removeprefix("layer_"))
        layers.setdefault(kind, []).append((index, weights if scanned else weights[None]))
    return {kind: jnp.concatenate([w for _, w in sorted(layers[kind], key=lambda item: item[0])])
            for kind in KINDS if kind in layers}


def token_labels(ids: Sequence[int], tokenizer=None, mask_id: int | None = None) -> list[str]:
    """Tick labels for token ids: SentencePiece pieces, or (synthetic runs) the ids, specials named."""
    if tokenizer is not None:
        return tokenizer.pieces(ids)
    names = {PAD_ID: "<pad>", EOS_ID: "</s>", mask_id: "[MASK]"}
    return [names.get(int(i), str(int(i))) for i in ids]


def _through_eos(tokens: np.ndarray) -> list[int]:
    """A decoded row [L] up to and including its first EOS (all of it when there is none)."""
    tokens = [int(t) for t in tokens]
    return tokens[:tokens.index(EOS_ID) + 1] if EOS_ID in tokens else tokens


def write_report(run, trainer, params, tokenizer, ids: Sequence[int], out_dir: str, *, title: str = "Attention maps",
                 notes: Sequence[str] = (), beam_size: int | None = None, alpha: float | None = None,
                 max_extra_length: int = 50) -> str:
    """Attention maps of one example of a loaded run (`inference.load_for_inference`) in `out_dir`; returns index.html.

    `ids`: the example's token ids, without EOS (appended here, as the input pipeline appends it). A
    translation run first translates them (beam search with the run's `decode` settings, or
    `beam_size`/`alpha` instead; greedy for a run without them), then runs the model once on (source,
    translation), teacher-forced; a language model or an MLM runs once on them. Writes
    `<kind>_layer<i>.png` (a grid of heads each), for translation `alignment.png` (the encoder-decoder
    attention averaged over all layers and heads), and index.html showing them.
    """
    model, objective = trainer.model, run.objective
    ids = list(ids)[:run.data.max_length - 1] + [EOS_ID]
    label = functools.partial(token_labels, tokenizer=tokenizer,
                              mask_id=trainer.mask_id if objective == "mlm" else None)
    rows = evaluation.batch_shards(trainer.batch_sharding)

    def batch(x):  # the example in every row: rows are split over the devices of the batch axes
        return jax.device_put(np.tile(np.asarray(x, np.int32)[None], (rows, 1)), trainer.batch_sharding)

    def text(x):
        return tokenizer.decode(x) if tokenizer is not None else " ".join(label(x))

    paragraphs = list(notes)
    forward = jax.jit(functools.partial(collect, model))
    with trainer.context():
        if objective == "translation":
            decode = run.decode
            beam_size = beam_size or (decode.beam_size if decode else 1)
            alpha = alpha if alpha is not None else (decode.alpha if decode else 0.6)
            penalty = decode.length_penalty if decode else "gnmt"
            translate = jax.jit(functools.partial(decoding.translate, model, eos_id=EOS_ID, beam_size=beam_size,
                                                  alpha=alpha, penalty=penalty, max_extra_length=max_extra_length))
            target = _through_eos(np.asarray(jax.device_get(translate(params, batch(ids))))[0])
            weights = forward(params, batch(ids), batch(target))
            how = "greedy" if beam_size == 1 else f"beam {beam_size}, alpha {alpha:g}"
            paragraphs += [f"Source: {text(ids)}", f"Translation ({how}): {text(target)}"]
        else:
            weights = forward(params, batch(ids))
            paragraphs.append(f"Text: {text(ids)}")
    weights = {kind: np.asarray(jax.device_get(w))[:, 0] for kind, w in weights.items()}  # [L, N, T, S]

    # Queries and keys are labelled by the token at their position; cross-attention rows by the
    # token predicted there (the alignment convention), one ahead of the decoder's input.
    if objective == "translation":
        decoder_inputs = [BOS] + label(target[:-1])
        axes = {"encoder": (label(ids), label(ids), "source token (query)", "source token (key)"),
                "decoder": (decoder_inputs, decoder_inputs, "decoder input (query)", "decoder input (key)"),
                "cross": (label(target), label(ids), "output token (query)", "source token (key)")}
    elif objective == "lm":
        decoder_inputs = [BOS] + label(ids[:-1])
        axes = {"decoder": (decoder_inputs, decoder_inputs, "input token (query)", "input token (key)")}
    else:
        axes = {"encoder": (label(ids), label(ids), "token (query)", "token (key)")}
    paragraphs.append("Tokens: " + " ".join(axes["encoder" if "encoder" in axes else "decoder"][0]))

    sections = []
    if "cross" in weights:
        cross = weights["cross"]
        caption = (f"Encoder-decoder attention averaged over {cross.shape[0]} layer(s) and {cross.shape[1]} heads: "
                   "rows are the output tokens, columns the source tokens.")
        queries, keys, query_axis, key_axis = axes["cross"]
        path = plots.attention_heatmaps(cross.mean(axis=(0, 1)), queries, keys,
                                        "Alignment (mean over layers and heads)",
                                        os.path.join(out_dir, "alignment.png"), row_axis=query_axis,
                                        column_axis=key_axis)
        sections.append(("Alignment", [(path, caption)]))
    for kind, name in KINDS.items():
        if kind not in weights:
            continue
        queries, keys, query_axis, key_axis = axes[kind]
        images = []
        for layer, layer_weights in enumerate(weights[kind]):
            path = plots.attention_heatmaps(layer_weights, queries, keys, f"{name}, layer {layer}",
                                            os.path.join(out_dir, f"{kind}_layer{layer}.png"), row_axis=query_axis,
                                            column_axis=key_axis)
            images.append((path, f"{name}, layer {layer}: one panel per head."))
        sections.append((name, images))
    return plots.write_page(os.path.join(out_dir, "index.html"), title, paragraphs, sections)
