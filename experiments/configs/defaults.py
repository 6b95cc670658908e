"""Defaults shared by every experiment config; each experiment's `get_config()` starts here.

This is the one place that gives a field a default. Fields that apply to some runs only are unset
(None, or () for tuples): set them where they apply. `transformer.run_config` reads every field,
rejects one set where it has no effect, and asks for one that a run needs but leaves unset.
"""

import dataclasses

import ml_collections

from transformer.config import ModelConfig

placeholder = ml_collections.config_dict.placeholder


def model_fields(preset: str) -> ml_collections.ConfigDict:
    """`config.model`: a preset name plus an unset override per ModelConfig field (None = the preset's value).

    The vocabulary size is not a field here: the data sets it (data.vocab_size, or the tokenizer's size).
    """
    defaults = ModelConfig()
    overrides = {f.name: placeholder(type(getattr(defaults, f.name)) if getattr(defaults, f.name) is not None else int)
                 for f in dataclasses.fields(ModelConfig) if f.name != "vocab_size"}
    return ml_collections.ConfigDict(dict(
        preset=preset,  # "tiny" | "base" | "big" (transformer.config.PRESETS)
        num_layers=placeholder(int),  # if set: the depth of every stack (wins over num_encoder/decoder_layers)
        **overrides))


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.objective = "translation"  # "translation" (EncoderDecoder) | "lm" (DecoderOnly) | "mlm" (EncoderOnly)
    config.model = model_fields("base")

    config.data = ml_collections.ConfigDict()
    config.data.name = "synthetic"  # "synthetic" | a dataset name understood by transformer.data
    config.data.vocab_size = 32  # synthetic: the vocabulary; real data: the SentencePiece size asked for
    config.data.max_length = 32  # tokens per row
    config.data.eval_batch_size = 64  # global rows per evaluation batch
    config.data.batch_size = placeholder(int)  # global rows per training step (synthetic, "pad", "pack")
    config.data.task = placeholder(str)  # synthetic translation: "copy" | "reverse" | "sort"
    config.data.eval_batches = placeholder(int)  # synthetic: batches per evaluation
    config.data.batching = placeholder(str)  # real data: "pad" | "bucket" (token budget by length) | "pack" | "stream"
    # ("stream", lm only, also synthetic: B parallel streams of one text, T consecutive tokens a step)
    config.data.tokens_per_batch = placeholder(int)  # "bucket": global tokens per batch (per side)
    config.data.tokenizer = placeholder(str)  # real data: SentencePiece model type, "unigram" | "bpe"
    config.data.train_split = placeholder(str)  # real data
    config.data.eval_split = placeholder(str)
    config.data.source_lang = placeholder(str)  # real translation data
    config.data.target_lang = placeholder(str)
    config.data.data_dir = placeholder(str)  # real data: TFDS data_dir (unset = TFDS's default)
    config.data.manual_dir = placeholder(str)  # real data: local raw files (Multi30k: *.en.gz / *.de.gz)
    config.data.text_feature = placeholder(str)  # real lm data: the text feature (unset = "text"; multi30k: "en")
    # Real data: a vocabulary that folds case (SentencePiece's nmt_nfkc_cf normalization), so that the
    # model reads and writes lowercase text, as in the Multi30k benchmark's preprocessed (lc.norm.tok) files.
    config.data.lowercase = False
    # Real data, unigram vocabulary: subword regularization (Kudo, 2018). Each time a training
    # sentence is read, one of its `subword_samples` most likely segmentations is drawn, with
    # probability P(x) ** subword_alpha (normalised); 0 = always the best one. Kudo's setting: 64, 0.1.
    config.data.subword_samples = 0
    config.data.subword_alpha = placeholder(float)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.schedule = "paper"  # "paper" | "rsqrt" | "inverse_sqrt" | "cosine" | "cosine_cycles" | "constant"
    config.optimizer.learning_rate = 1.0  # peak (inverse_sqrt, cosine, constant; cosine_cycles' base) or scale (paper)
    config.optimizer.warmup_steps = placeholder(int)  # paper, inverse_sqrt, cosine (cosine_cycles: cycle_warmup_steps)
    # cosine_cycles only: one entry per cycle; lengths sum to num_train_steps, peaks are
    # learning_rate * cycle_lr_scales.
    config.optimizer.cycle_steps = ()
    config.optimizer.cycle_lr_scales = ()
    config.optimizer.cycle_warmup_steps = ()
    config.optimizer.b1 = 0.9  # paper, Sec. 5.3
    config.optimizer.b2 = 0.98
    config.optimizer.eps = 1e-9
    config.optimizer.weight_decay = 0.0
    config.optimizer.clip_grad_norm = 0.0  # 0 = no clipping
    config.optimizer.grad_accum_steps = 1  # micro-batches per update
    # > 0: the optimizer state also keeps a moving average of the parameters, ema <- d * ema + (1 - d) *
    # params after each update (~the last 1 / (1 - d) updates); score it with --checkpoint=ema.
    config.optimizer.ema_decay = 0.0

    config.label_smoothing = 0.1  # paper, Sec. 5.4
    config.dropout = True  # False: train deterministically (tests, debugging)
    config.num_train_steps = 100_000
    config.max_train_minutes = 0.0  # > 0: stop (and checkpoint) once training has run this long
    # With a budget and a schedule that reads num_train_steps (cosine): at the end of the warmup, train
    # only the steps the budget allows at the measured rate, so the schedule still anneals to its end.
    config.fit_steps_to_budget = False
    config.log_every = 100
    config.eval_every = 1000
    config.prng_impl = ""  # jax_default_prng_impl: "" = JAX's default (threefry); "unsafe_rbg" is cheaper
    config.peak_flops_per_device = 0.0  # for MFU; 0 = look up the device kind
    # data.batching="stream": Transformer-XL memory length of evaluation (unset = model.memory_length);
    # may exceed the training one, the parameters do not depend on it.
    config.eval_memory_length = placeholder(int)

    # Translation on real data: sacreBLEU on the eval split every N steps (a multiple of eval_every;
    # 0 = never), and how to decode (also the default of experiments.evaluate / translate).
    config.bleu_every = 0
    config.decode = ml_collections.ConfigDict()
    config.decode.beam_size = placeholder(int)  # paper: beam 4, length penalty alpha 0.6
    config.decode.alpha = placeholder(float)
    config.decode.length_penalty = placeholder(str)  # "gnmt": ((5 + |y|) / 6) ** alpha; "power": |y| ** alpha
    config.decode.batch_size = placeholder(int)  # sentences per decoding batch
    config.decode.bleu_sentences = placeholder(int)  # sentences scored during training (0 = the whole eval split)

    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the devices left

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every = 1000
    config.checkpoint.keep = 3  # the last N
    config.checkpoint.best_metric = "eval_loss"  # also keep the best checkpoint by this eval metric ("" = not)
    config.checkpoint.best_mode = "min"  # "min" | "max"
    return config


def real_translation_data(config: ml_collections.ConfigDict, name: str, *, source_lang: str, target_lang: str,
                          vocab_size: int, tokenizer: str) -> None:
    """Points `config.data` at translation dataset `name` (TFDS splits "train" / "validation")."""
    config.data.update(name=name, source_lang=source_lang, target_lang=target_lang, vocab_size=vocab_size,
                       tokenizer=tokenizer, train_split="train", eval_split="validation")
    config.decode.update(beam_size=4, alpha=0.6, length_penalty="gnmt", batch_size=64, bleu_sentences=0)


def synthetic_data(config: ml_collections.ConfigDict, *, batch_size: int, max_length: int, vocab_size: int,
                   task: str | None = None, eval_batches: int = 4) -> None:
    """Synthetic rows: `task` ("copy" | "reverse" | "sort") for translation, a Markov chain otherwise."""
    config.data.update(name="synthetic", batch_size=batch_size, eval_batch_size=batch_size, max_length=max_length,
                       vocab_size=vocab_size, eval_batches=eval_batches)
    config.data.task = task


def vision_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    """Defaults of image classification with a ViT (`transformer.vision_training`), read by
    `VisionTrainConfig.from_dict`. The encoder is `config.model`; the optimizer section is base_config's."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # parameters, dropout, augmentation and the data order
    config.model = model_fields(preset)
    # ViT's recipe (Dosovitskiy et al. 2021): learned positions, pre-norm, GELU.
    config.model.update(position="learned", norm_position="pre", activation="gelu")

    config.image = ml_collections.ConfigDict()  # transformer.vision.VisionConfig; must match the data
    config.image.image_size = placeholder(int)  # height = width in pixels
    config.image.channels = placeholder(int)
    config.image.patch_size = placeholder(int)  # P: non-overlapping P x P patches
    config.image.pooling = "cls"  # "cls" (class token) | "mean" (average of the patch states)
    config.image.num_classes = placeholder(int)

    config.data = ml_collections.ConfigDict()
    config.data.name = placeholder(str)  # "digits" (scikit-learn, offline) | "cifar10" (TFDS)
    config.data.batch_size = placeholder(int)  # global images per training step
    config.data.eval_batch_size = 256  # global images per evaluation batch
    config.data.max_shift = 0  # augmentation: random translations of up to this many pixels (0 = none)
    config.data.flip = False  # augmentation: random left-right flips
    config.data.split_seed = placeholder(int)  # digits: seed of the stratified 80/20 train/test split
    config.data.data_dir = placeholder(str)  # cifar10: TFDS data_dir (unset = TFDS's default)

    config.optimizer = base_config().optimizer  # schedule, learning_rate, warmup_steps, b1, b2, ...
    config.optimizer.b2 = 0.999  # ViT's Adam (the translation recipe's 0.98 is the paper's)
    config.optimizer.eps = 1e-8
    config.label_smoothing = 0.0
    config.num_train_steps = placeholder(int)
    config.log_every = 100
    config.eval_every = 1000  # and at the end

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every = 1000  # and at the end
    config.checkpoint.keep = 2  # the last N
    config.checkpoint.best_metric = "eval_accuracy"  # also keep the best checkpoint by this ("" = not)
    config.checkpoint.best_mode = "max"
    return config
