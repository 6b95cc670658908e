"""Hugging Face MarianMT <-> this project's EncoderDecoder: configs, weights and tokenizer files.

MarianMT is the paper's model as this project builds it by default: post-LN layers, sinusoidal
positions, one embedding matrix shared by encoder, decoder and the pre-softmax projection (scaled by
sqrt(d_model)), a decoder that starts from the pad id. Four things differ, and the conversion
handles each exactly:
  * Channel order of the sinusoids: ours interleave sin and cos (the paper's formula), Marian puts
    all sines first. Permuting the model's D channels (every weight that reads or writes the
    residual stream, and the norms, which are permutation-invariant) turns one into the other.
  * Marian's projections have biases: ours get them with `ModelConfig.attention_bias` (export
    writes zeros when they are off).
  * Marian's LayerNorm epsilon is PyTorch's 1e-5 (ours: `ModelConfig.norm_epsilon`, 1e-6 by
    default): a model trained with 1e-6 exports with a small difference, reported by the export.
  * Activations: relu = relu, swish = silu, gelu_new (tanh approximation) = our gelu.

Weights are numpy arrays keyed by Hugging Face's names; torch and transformers are needed only by
the functions that read or write a Marian directory, and are imported there.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from transformer import tokens
from transformer.config import ModelConfig

MARIAN_NORM_EPSILON = 1e-5  # torch.nn.LayerNorm's default, fixed in Hugging Face's Marian layers
# Our activation -> Marian's `activation_function` (and back).
ACTIVATIONS = {"relu": "relu", "silu": "swish", "gelu": "gelu_new"}
_FROM_MARIAN_ACTIVATIONS = {"relu": "relu", "swish": "silu", "silu": "silu", "gelu_new": "gelu",
                            "gelu_pytorch_tanh": "gelu"}
_ATTENTION = {"self_attention": "self_attn", "cross_attention": "encoder_attn"}
_NORMS = {"self_attention_norm": "self_attn_layer_norm", "cross_attention_norm": "encoder_attn_layer_norm",
          "feed_forward_norm": "final_layer_norm"}


class MarianError(ValueError):
    """A model that the other side cannot express; the message lists every mismatch."""


def export_mismatches(cfg: ModelConfig, objective: str = "translation") -> list[str]:
    """Everything about `cfg` that a MarianMT model cannot express (empty: exportable)."""
    problems = []
    if objective != "translation":
        problems.append(f"objective {objective!r}: MarianMT is an encoder-decoder (objective 'translation')")
    checks = [
        (cfg.position == "sinusoidal", f"position={cfg.position!r} (Marian: 'sinusoidal')"),
        (cfg.norm == "layernorm", f"norm={cfg.norm!r} (Marian: 'layernorm')"),
        (cfg.norm_position == "post", f"norm_position={cfg.norm_position!r} (Marian: 'post')"),
        (cfg.activation in ACTIVATIONS, f"activation={cfg.activation!r} (Marian: one of {sorted(ACTIVATIONS)})"),
        (cfg.num_kv_heads in (None, cfg.num_heads),
         f"num_kv_heads={cfg.num_kv_heads} (grouped key/value heads; Marian: as many as query heads)"),
        (cfg.share_embeddings, "share_embeddings=False (Marian here: one embedding for both sides)"),
        (cfg.tie_output, "tie_output=False (an untied output projection; Marian: tied to the embedding)"),
        (cfg.sliding_window is None, f"sliding_window={cfg.sliding_window} (Marian: global attention)"),
        (cfg.d_model % 2 == 0, f"d_model={cfg.d_model} is odd (Marian's sinusoids need an even width)"),
    ]
    problems += [message for ok, message in checks if not ok]
    return problems


def check_exportable(cfg: ModelConfig, objective: str = "translation") -> None:
    problems = export_mismatches(cfg, objective)
    if problems:
        raise MarianError("This model cannot be written as a MarianMT model:\n  - " + "\n  - ".join(problems))


def channel_order(d_model: int) -> np.ndarray:
    """perm [D]: Marian's channel j is our channel perm[j] (sines first: ours at even channels)."""
    return np.concatenate([np.arange(0, d_model, 2), np.arange(1, d_model, 2)])


def marian_config(cfg: ModelConfig, *, num_beams: int = 4, length_penalty: float = 1.0) -> dict[str, Any]:
    """The config.json of a MarianMT model with `cfg`'s architecture and this project's special ids."""
    check_exportable(cfg)
    return dict(
        model_type="marian", architectures=["MarianMTModel"],
        vocab_size=cfg.vocab_size, decoder_vocab_size=cfg.vocab_size, d_model=cfg.d_model,
        encoder_layers=cfg.num_encoder_layers, decoder_layers=cfg.num_decoder_layers,
        encoder_attention_heads=cfg.num_heads, decoder_attention_heads=cfg.num_heads,
        encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff, activation_function=ACTIVATIONS[cfg.activation],
        max_position_embeddings=max(cfg.max_len, 512),
        dropout=cfg.dropout_rate, attention_dropout=cfg.attention_dropout_rate, activation_dropout=0.0,
        scale_embedding=True, share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
        pad_token_id=tokens.PAD_ID, decoder_start_token_id=tokens.PAD_ID, eos_token_id=tokens.EOS_ID,
        forced_eos_token_id=tokens.EOS_ID, bos_token_id=None, is_encoder_decoder=True,
        num_beams=num_beams, length_penalty=length_penalty, max_length=cfg.max_len,
        torch_dtype="float32")


def _layers(params: dict, stack: str, num_layers: int) -> list[dict]:
    """The per-layer parameter dicts of a stack, from a Python loop or an `nn.scan` ("layers")."""
    tree = params[stack]
    if "layers" in tree:  # scan_layers=True: leading axis = layer
        import jax  # noqa: PLC0415

        return [jax.tree.map(lambda x, i=i: np.asarray(x[i]), tree["layers"]) for i in range(num_layers)]
    return [tree[f"layer_{i}"] for i in range(num_layers)]


def to_marian_weights(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our EncoderDecoder params -> MarianMTModel's state dict (float32 numpy, Hugging Face names)."""
    check_exportable(cfg)
    perm = channel_order(cfg.d_model)
    d, inner = cfg.d_model, cfg.num_heads * cfg.head_dim
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    out = {"model.shared.weight": f32(params["embedding"]["embedding"])[:, perm],
           "final_logits_bias": np.zeros((1, cfg.vocab_size), np.float32)}

    def attention(prefix, p):
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            out[f"{prefix}.{theirs}.weight"] = f32(p[ours]).reshape(d, inner).T[:, perm]  # [N*H, D]
            bias = p.get(f"{ours}_bias")
            out[f"{prefix}.{theirs}.bias"] = np.zeros(inner, np.float32) if bias is None else f32(bias).reshape(inner)
        out[f"{prefix}.out_proj.weight"] = f32(p["out"]).reshape(inner, d).T[perm]  # [D, N*H]
        bias = p.get("out_bias")
        out[f"{prefix}.out_proj.bias"] = f32(bias)[perm] if bias is not None else np.zeros(d, np.float32)

    def layer(prefix, p):
        for ours, theirs in _ATTENTION.items():
            if ours in p:
                attention(f"{prefix}.{theirs}", p[ours])
        for ours, theirs in _NORMS.items():
            if ours in p:
                out[f"{prefix}.{theirs}.weight"] = f32(p[ours]["scale"])[perm]
                out[f"{prefix}.{theirs}.bias"] = f32(p[ours]["bias"])[perm]
        ff = p["feed_forward"]
        out[f"{prefix}.fc1.weight"] = f32(ff["wi"]).T[:, perm]  # [F, D]
        out[f"{prefix}.fc1.bias"] = f32(ff["wi_bias"])
        out[f"{prefix}.fc2.weight"] = f32(ff["wo"]).T[perm]  # [D, F]
        out[f"{prefix}.fc2.bias"] = f32(ff["wo_bias"])[perm]

    for stack, num_layers in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        for i, p in enumerate(_layers(params, stack, num_layers)):
            layer(f"model.{stack}.layers.{i}", p)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def import_mismatches(config: dict, weights: dict[str, np.ndarray]) -> list[str]:
    """Everything about a Marian model (config.json dict, state dict) that our EncoderDecoder cannot express."""
    problems = []
    get = config.get
    activation = get("activation_function", "gelu")
    if activation not in _FROM_MARIAN_ACTIVATIONS:
        problems.append(f"activation_function={activation!r} (ours: one of {sorted(_FROM_MARIAN_ACTIVATIONS)}; "
                        "'gelu' is the exact erf form, ours the tanh approximation 'gelu_new')")
    if not get("share_encoder_decoder_embeddings", True):
        problems.append("share_encoder_decoder_embeddings=False (separate source and target vocabularies)")
    if not get("tie_word_embeddings", True):
        problems.append("tie_word_embeddings=False (an output projection apart from the embedding)")
    if not get("scale_embedding", False):
        problems.append("scale_embedding=False (ours scale embeddings by sqrt(d_model), as the paper)")
    for ours, theirs in (("num_heads", "attention_heads"), ("d_ff", "ffn_dim")):
        if get(f"encoder_{theirs}") != get(f"decoder_{theirs}"):
            problems.append(f"encoder_{theirs}={get(f'encoder_{theirs}')} != decoder_{theirs}="
                            f"{get(f'decoder_{theirs}')} (ours: one {ours} for both stacks)")
    if get("d_model", 0) % 2:
        problems.append(f"d_model={get('d_model')} is odd")
    if get("decoder_vocab_size") not in (None, get("vocab_size")):
        problems.append(f"decoder_vocab_size={get('decoder_vocab_size')} != vocab_size={get('vocab_size')}")
    for name, want in (("pad_token_id", tokens.PAD_ID), ("decoder_start_token_id", tokens.PAD_ID),
                       ("eos_token_id", tokens.EOS_ID)):
        if get(name) != want:
            problems.append(f"{name}={get(name)} (ours: {want}; the vocabulary must put pad, eos, unk at 0, 1, 2)")
    if get("normalize_before", False) or get("add_final_layer_norm", False):
        problems.append("pre-norm layers or a final layer norm (Marian's and ours are post-norm)")
    bias = weights.get("final_logits_bias")
    if bias is not None and np.any(bias != 0):
        problems.append("a non-zero final_logits_bias (ours has no output bias)")
    return problems


def model_config_from_marian(config: dict, weights: dict[str, np.ndarray] | None = None, **overrides) -> ModelConfig:
    """Our ModelConfig for a Marian config.json dict; raises MarianError listing every mismatch."""
    problems = import_mismatches(config, weights or {})
    if problems:
        raise MarianError("This MarianMT model cannot be expressed as our EncoderDecoder:\n  - "
                          + "\n  - ".join(problems))
    fields = dict(
        vocab_size=config["vocab_size"], d_model=config["d_model"], d_ff=config["encoder_ffn_dim"],
        num_heads=config["encoder_attention_heads"], num_encoder_layers=config["encoder_layers"],
        num_decoder_layers=config["decoder_layers"], dropout_rate=float(config.get("dropout", 0.1)),
        attention_dropout_rate=float(config.get("attention_dropout", 0.0)),
        max_len=int(config.get("max_position_embeddings", 512)), position="sinusoidal",
        activation=_FROM_MARIAN_ACTIVATIONS[config.get("activation_function", "gelu")], norm="layernorm",
        norm_position="post", norm_epsilon=MARIAN_NORM_EPSILON, attention_bias=True, share_embeddings=True,
        tie_output=True)
    fields.update(overrides)
    return ModelConfig(**fields)


def from_marian_weights(weights: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """MarianMTModel's state dict -> our EncoderDecoder params (unscanned layers, float32 numpy)."""
    inverse = np.argsort(channel_order(cfg.d_model))  # our channel c is Marian's channel inverse[c]
    d, n, h = cfg.d_model, cfg.num_heads, cfg.head_dim
    w = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    shared = w.get("model.shared.weight")
    if shared is None:
        shared = w["model.encoder.embed_tokens.weight"]
    params: dict[str, Any] = {"embedding": {"embedding": shared[:, inverse]}}

    def attention(prefix):
        p = {}
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            p[ours] = w[f"{prefix}.{theirs}.weight"][:, inverse].T.reshape(d, n, h)
            p[f"{ours}_bias"] = w[f"{prefix}.{theirs}.bias"].reshape(n, h)
        p["out"] = w[f"{prefix}.out_proj.weight"][inverse].T.reshape(n, h, d)
        p["out_bias"] = w[f"{prefix}.out_proj.bias"][inverse]
        return p

    def layer(prefix, cross):
        p = {"self_attention": attention(f"{prefix}.self_attn")}
        if cross:
            p["cross_attention"] = attention(f"{prefix}.encoder_attn")
        for ours, theirs in _NORMS.items():
            if ours == "cross_attention_norm" and not cross:
                continue
            p[ours] = {"scale": w[f"{prefix}.{theirs}.weight"][inverse], "bias": w[f"{prefix}.{theirs}.bias"][inverse]}
        p["feed_forward"] = {"wi": w[f"{prefix}.fc1.weight"][:, inverse].T, "wi_bias": w[f"{prefix}.fc1.bias"],
                             "wo": w[f"{prefix}.fc2.weight"][inverse].T, "wo_bias": w[f"{prefix}.fc2.bias"][inverse]}
        return p

    for stack, num_layers, cross in (("encoder", cfg.num_encoder_layers, False),
                                     ("decoder", cfg.num_decoder_layers, True)):
        params[stack] = {f"layer_{i}": layer(f"model.{stack}.layers.{i}", cross) for i in range(num_layers)}
    return params


# --- Marian directories (need transformers, safetensors, torch) -------------------------------------------------


def write_tokenizer_files(spm_model: bytes, vocab: list[str], out_dir: str, *, source_lang: str | None = None,
                          target_lang: str | None = None, max_length: int = 512) -> None:
    """MarianTokenizer's files from one SentencePiece model: source.spm = target.spm, vocab.json
    (piece -> our id, so that the tokenizer's ids are ours), tokenizer_config.json."""
    for name in ("source.spm", "target.spm"):
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(spm_model)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({piece: i for i, piece in enumerate(vocab)}, f, ensure_ascii=False, indent=0)
    tokenizer_config = dict(tokenizer_class="MarianTokenizer", source_lang=source_lang, target_lang=target_lang,
                            unk_token=vocab[tokens.UNK_ID], eos_token=vocab[tokens.EOS_ID],
                            pad_token=vocab[tokens.PAD_ID], model_max_length=max_length, separate_vocabs=False)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({k: tokenizer_config[k] for k in ("unk_token", "eos_token", "pad_token")}, f, indent=2)


def write_marian(out_dir: str, config: dict, weights: dict[str, np.ndarray]) -> None:
    """config.json and model.safetensors of a MarianMT directory."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        generation = {k: config[k] for k in ("decoder_start_token_id", "pad_token_id", "eos_token_id",
                                             "forced_eos_token_id", "num_beams", "length_penalty", "max_length")}
        # Stop a beam search only when no live hypothesis can still win (as ours does).
        json.dump(dict(generation, early_stopping="never"), f, indent=2)
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def read_marian(marian_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, state dict as numpy) of a MarianMT directory (model.safetensors or pytorch_model.bin)."""
    with open(os.path.join(marian_dir, "config.json")) as f:
        config = json.load(f)
    if config.get("model_type") != "marian":
        raise MarianError(f"{marian_dir}/config.json has model_type={config.get('model_type')!r}, not 'marian'.")
    path = os.path.join(marian_dir, "model.safetensors")
    if os.path.exists(path):
        from safetensors.numpy import load_file  # noqa: PLC0415

        return config, load_file(path)
    path = os.path.join(marian_dir, "pytorch_model.bin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No model.safetensors or pytorch_model.bin in {marian_dir}.")
    import torch  # noqa: PLC0415

    state = torch.load(path, map_location="cpu", weights_only=True)
    return config, {k: v.float().numpy() for k, v in state.items()}


def read_marian_vocab(marian_dir: str) -> tuple[bytes, list[str]]:
    """(source.spm bytes, vocab.json pieces in id order); the vocabulary must be the SentencePiece
    model's own, one shared by both sides, with pad, eos, unk at 0, 1, 2 (this project's ids)."""
    problems = []
    with open(os.path.join(marian_dir, "source.spm"), "rb") as f:
        spm_model = f.read()
    target = os.path.join(marian_dir, "target.spm")
    if os.path.exists(target) and open(target, "rb").read() != spm_model:
        problems.append("source.spm and target.spm differ (ours: one SentencePiece model for both sides)")
    with open(os.path.join(marian_dir, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    pieces = sorted(vocab, key=vocab.get)
    import sentencepiece as spm  # noqa: PLC0415

    processor = spm.SentencePieceProcessor(model_proto=spm_model)
    spm_pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    if [vocab[p] for p in pieces] != list(range(len(pieces))) or pieces != spm_pieces:
        problems.append("vocab.json is not the SentencePiece model's own id order (ours index pieces by their "
                        "SentencePiece ids)")
    ids = (processor.pad_id(), processor.eos_id(), processor.unk_id())
    if ids != (tokens.PAD_ID, tokens.EOS_ID, tokens.UNK_ID):
        problems.append(f"the SentencePiece model has (pad, eos, unk) ids {ids}, ours are "
                        f"{(tokens.PAD_ID, tokens.EOS_ID, tokens.UNK_ID)}")
    if problems:
        raise MarianError(f"The tokenizer of {marian_dir} cannot be used as ours:\n  - " + "\n  - ".join(problems))
    return spm_model, pieces


# --- Workdirs ---------------------------------------------------------------------------------------------------


def export_workdir(workdir: str, out_dir: str, checkpoint: str = "latest", step: int | None = None) -> dict:
    """Writes the translation run in `workdir` as a MarianMT directory; returns its config.json dict."""
    from transformer import inference  # noqa: PLC0415

    run, trainer, params, tokenizer, step = inference.load_for_inference(workdir, checkpoint, step)
    cfg = trainer.model_cfg
    check_exportable(cfg, run.objective)
    if tokenizer is None:
        raise MarianError(f"{workdir} trained on synthetic data ({run.data.name!r}): MarianTokenizer needs a "
                          "SentencePiece vocabulary.")
    import jax  # noqa: PLC0415

    params = jax.tree.map(np.asarray, jax.device_get(params))
    config = marian_config(cfg, num_beams=run.decode.beam_size, length_penalty=run.decode.alpha)
    config["norm_epsilon_trained"] = cfg.norm_epsilon  # what the run used (Marian's layers use 1e-5)
    write_marian(out_dir, config, to_marian_weights(params, cfg))
    write_tokenizer_files(tokenizer.serialized_model(), tokenizer.pieces(range(tokenizer.vocab_size)), out_dir,
                          source_lang=run.data.source_lang, target_lang=run.data.target_lang)
    with open(os.path.join(out_dir, "export.json"), "w") as f:
        json.dump(dict(workdir=os.path.basename(os.path.abspath(workdir)), checkpoint=checkpoint, step=step), f)
    return config


def import_workdir(marian_dir: str, workdir: str, config) -> Any:
    """Makes `workdir` from a MarianMT directory: config.json (`config`, an ml_collections experiment
    config, with the model fields Marian's), spm.model, and a step-0 checkpoint of the weights with
    a fresh optimizer state. Returns the TrainConfig."""
    import jax  # noqa: PLC0415

    from transformer import checkpointing, sharding, training  # noqa: PLC0415
    from transformer import workdir as workdir_lib  # noqa: PLC0415
    from transformer.data import tokenizer as tokenizer_lib  # noqa: PLC0415
    from transformer.run_config import TrainConfig  # noqa: PLC0415

    marian_config_dict, weights = read_marian(marian_dir)
    spm_model, pieces = read_marian_vocab(marian_dir)
    cfg = model_config_from_marian(marian_config_dict, weights)
    if len(pieces) != cfg.vocab_size:
        raise MarianError(f"vocab.json has {len(pieces)} pieces, the model {cfg.vocab_size} embeddings.")
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    if os.path.exists(checkpoint_dir) and os.listdir(checkpoint_dir):
        raise FileExistsError(f"{checkpoint_dir} already holds checkpoints: import into a new workdir.")
    with config.unlocked():
        config.objective = "translation"
        config.data.vocab_size = cfg.vocab_size
        fields = ("d_model", "d_ff", "num_heads", "num_encoder_layers", "num_decoder_layers", "max_len", "position",
                  "activation", "norm", "norm_position", "norm_epsilon", "attention_bias", "share_embeddings",
                  "tie_output")
        for name in fields:
            config.model[name] = getattr(cfg, name)
        config.model.num_layers = None
        config.model.num_kv_heads = None
        config.model.scan_layers = False
    run = TrainConfig.from_dict(config)
    os.makedirs(workdir, exist_ok=True)
    spm_path = os.path.join(workdir, "spm.model")
    with open(spm_path, "wb") as f:
        f.write(spm_model)
    tokenizer = tokenizer_lib.load_tokenizer(spm_path)
    model_cfg = run.model_config(tokenizer.vocab_size)
    mesh = sharding.make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor)
    trainer = training.Trainer(run, model_cfg, mesh)
    state = trainer.init_state(run.seed)
    imported = from_marian_weights(weights, model_cfg)
    try:
        params = jax.tree.map(lambda ref, new: jax.device_put(np.asarray(new, ref.dtype), ref.sharding),
                              state.params, imported)
    except ValueError as e:
        raise MarianError(f"The imported weights do not have this model's parameter tree: {e}") from e
    state = state.replace(params=params)
    ckpt = checkpointing.Checkpointer(checkpoint_dir, keep=run.checkpoint.keep)
    try:
        ckpt.save(0, state)
        ckpt.wait()
    finally:
        ckpt.close()
    workdir_lib.write_state_signature(checkpoint_dir, trainer.abstract_state)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    return run
