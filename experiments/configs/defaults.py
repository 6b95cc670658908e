"""Defaults shared by every experiment config; each experiment's `get_config()` starts here."""

import dataclasses

import ml_collections

from transformer.config import ModelConfig


def model_fields(preset: str) -> ml_collections.ConfigDict:
    """`config.model`: a preset name plus every ModelConfig field, so each is overridable by flag."""
    fields = dataclasses.asdict(ModelConfig.preset(preset))
    fields["num_kv_heads"] = ml_collections.config_dict.placeholder(int)
    fields["sliding_window"] = ml_collections.config_dict.placeholder(int)
    return ml_collections.ConfigDict(dict(
        preset=preset,
        num_layers=ml_collections.config_dict.placeholder(int),  # if set: encoder and decoder depth
        **fields))


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.objective = "translation"  # "translation" (EncoderDecoder) | "lm" (DecoderOnly) | "mlm" (EncoderOnly)
    config.model = model_fields("base")

    config.data = ml_collections.ConfigDict()
    config.data.name = "synthetic"  # "synthetic" | a dataset name understood by transformer.data
    config.data.task = "copy"  # synthetic translation task: "copy" | "reverse" | "sort"
    config.data.batch_size = 64  # global rows per step (split over processes)
    config.data.max_length = 32  # tokens per row
    config.data.vocab_size = 32  # synthetic vocabulary (real data: the SentencePiece size)
    config.data.eval_batches = 4  # synthetic: batches per evaluation
    config.data.batching = "bucket"  # real data: "pad" | "bucket" (token budget by length) | "pack"
    config.data.tokens_per_batch = 4096  # "bucket": global tokens per batch (per side)
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.source_lang = "en"
    config.data.target_lang = "de"
    config.data.data_dir = ""  # TFDS data_dir ("" = TFDS's default)
    config.data.manual_dir = ""  # local raw files (Multi30k: the *.en.gz / *.de.gz files)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.schedule = "paper"  # "paper" | "inverse_sqrt" | "cosine" | "cosine_cycles" | "constant"
    config.optimizer.learning_rate = 1.0  # peak (inverse_sqrt, cosine, constant) or scale (paper)
    config.optimizer.warmup_steps = 4000
    # cosine_cycles only: one entry per cycle; lengths sum to num_train_steps, peaks are
    # learning_rate * cycle_lr_scales (warmup_steps is not used).
    config.optimizer.cycle_steps = ()
    config.optimizer.cycle_lr_scales = ()
    config.optimizer.cycle_warmup_steps = ()
    config.optimizer.b1 = 0.9  # paper, Sec. 5.3
    config.optimizer.b2 = 0.98
    config.optimizer.eps = 1e-9
    config.optimizer.weight_decay = 0.0
    config.optimizer.clip_grad_norm = 0.0  # 0 = no clipping
    config.optimizer.grad_accum_steps = 1  # micro-batches per update

    config.label_smoothing = 0.1  # paper, Sec. 5.4
    config.dropout = True  # False: train deterministically (tests, debugging)
    config.num_train_steps = 100_000
    config.max_train_minutes = 0.0  # > 0: stop (and checkpoint) once training has run this long
    config.log_every = 100
    config.eval_every = 1000
    config.prng_impl = ""  # jax_default_prng_impl: "" = JAX's default (threefry); "unsafe_rbg" is cheaper
    config.peak_flops_per_device = 0.0  # for MFU; 0 = look up the device kind

    config.bleu_every = 0  # translation on real data: sacreBLEU on the eval split every N steps (a multiple of eval_every)
    config.decode = ml_collections.ConfigDict()
    config.decode.beam_size = 4  # paper: beam 4, length penalty alpha 0.6
    config.decode.alpha = 0.6
    config.decode.batch_size = 64  # sentences per decoding batch
    config.decode.bleu_sentences = 0  # sentences scored during training (0 = the whole eval split)

    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every = 1000
    config.checkpoint.keep = 3  # the last N
    config.checkpoint.best_metric = "eval_loss"  # also keep the best checkpoint by this eval metric
    config.checkpoint.best_mode = "min"
    return config
