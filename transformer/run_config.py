"""An experiment's config, converted once at the boundary into frozen, validated dataclasses.

Experiments are ml_collections ConfigDicts (`experiments/configs/*.py`), so that every field can be
overridden by flag. `TrainConfig.from_dict(config)` reads every leaf of one exactly once, checks it,
and returns the typed config that the library uses from then on; nothing below this module reads a
ConfigDict. A leaf that would have no effect is an error, never silently ignored:

  * a leaf that applies to some runs only (`data.task` to synthetic data, `data.tokens_per_batch`
    to bucketing, `optimizer.warmup_steps` to schedules with a warmup, ...) is unset (None, or ()
    for tuples) by default; setting it where it cannot apply raises a ValueError naming it, and
    leaving it unset where it is needed raises one too;
  * `config.model` is a preset name plus explicit overrides (unset = the preset's value), so
    `--config.model.preset=big` means the big preset with the config's overrides on top;
  * an unknown leaf is an error (lock_config catches it on the command line, this module in a
    config read back from a workdir).

`strict=False` (restoring old workdirs) drops inapplicable leaves with a warning instead.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from absl import logging

from transformer import schedules, tokens
from transformer.config import LENGTH_PENALTIES, ModelConfig
from transformer.data import synthetic

OBJECTIVES = ("translation", "lm", "mlm")  # EncoderDecoder, DecoderOnly, EncoderOnly
BATCHINGS = ("pad", "bucket", "pack", "stream")  # "stream": lm only, consecutive segments (transformer.data.stream)
TOKENIZER_TYPES = ("unigram", "bpe", "char")  # SentencePiece model types
PRNG_IMPLS = ("", "threefry2x32", "rbg", "unsafe_rbg")
CYCLE_FIELDS = ("cycle_steps", "cycle_lr_scales", "cycle_warmup_steps")
# fit_steps_to_budget: the step rate is measured from FIT_SKIP_STEPS into the run (compiled, warm) to the
# end of the warmup, which must be at least FIT_MIN_WARMUP steps long.
FIT_SKIP_STEPS = 10
FIT_MIN_WARMUP = 20


class ConfigError(ValueError):
    """A config field that is unknown, ill-typed, out of range, missing, or set where it has no effect."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: str  # "synthetic" or a dataset `transformer.data` loads (e.g. "multi30k", "wmt14_translate/de-en")
    vocab_size: int  # synthetic: the vocabulary; real data: the SentencePiece size asked for
    max_length: int  # tokens per row
    eval_batch_size: int  # global rows per evaluation batch
    batch_size: int | None = None  # global rows per training step: synthetic data, "pad" and "pack"
    task: str | None = None  # synthetic translation: one of transformer.data.synthetic.TASKS
    eval_batches: int | None = None  # synthetic: batches per evaluation
    batching: str | None = None  # real data: one of BATCHINGS; synthetic lm: "stream" or None
    tokens_per_batch: int | None = None  # "bucket": global tokens per batch (per side)
    tokenizer: str | None = None  # real data: SentencePiece model type, one of TOKENIZER_TYPES
    train_split: str | None = None  # real data
    eval_split: str | None = None
    source_lang: str | None = None  # real translation data
    target_lang: str | None = None
    data_dir: str | None = None  # real data: TFDS data_dir (None = TFDS's default)
    manual_dir: str | None = None  # real data: local raw files (None = download)
    text_feature: str | None = None  # real lm data: the dataset's text feature (None = "text"; multi30k: "en", "de")
    lowercase: bool = False  # real data: the vocabulary folds case, so the model reads and writes lowercase text
    subword_samples: int = 0  # real data, unigram vocabulary: draw each training read from the n best segmentations
    subword_alpha: float | None = None  # with subword_samples: P(draw x) ~ P(x) ** alpha (Kudo, 2018)

    @property
    def synthetic(self) -> bool:
        return self.name == "synthetic"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    schedule: str  # a key of schedules.CONFIG_BUILDERS
    learning_rate: float  # the peak, or the scale of the "paper" schedule
    b1: float
    b2: float
    eps: float
    weight_decay: float  # decoupled (AdamW); 0 = none
    clip_grad_norm: float  # 0 = no clipping
    grad_accum_steps: int  # micro-batches per update
    warmup_steps: int | None = None  # schedules with one warmup
    cycle_steps: tuple[int, ...] = ()  # "cosine_cycles": one entry per cycle
    cycle_lr_scales: tuple[float, ...] = ()
    cycle_warmup_steps: tuple[int, ...] = ()
    ema_decay: float = 0.0  # > 0: also keep a moving average of the parameters (0 = none)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    beam_size: int  # 1 = greedy
    alpha: float  # length penalty exponent
    length_penalty: str  # its form: "gnmt" (Wu et al. 2016) or "power" (length ** alpha, as Hugging Face)
    batch_size: int  # sentences per decoding batch
    bleu_sentences: int  # eval sentences scored during training (0 = all)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int
    keep: int  # the last N
    best_metric: str | None  # also keep the best checkpoint by this eval metric (None = do not)
    best_mode: str  # "min" | "max"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int  # -1 = the devices the other axes leave
    fsdp: int
    tensor: int


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run reads, validated."""

    seed: int
    objective: str  # one of OBJECTIVES
    model: ModelConfig  # its vocab_size is data.vocab_size (+1 for MLM's [MASK]) until the tokenizer says otherwise
    data: DataConfig
    optimizer: OptimizerConfig
    checkpoint: CheckpointConfig
    mesh: MeshConfig
    label_smoothing: float
    dropout: bool  # False: train deterministically (tests, debugging)
    num_train_steps: int
    max_train_minutes: float  # 0 = no time budget
    fit_steps_to_budget: bool  # with max_train_minutes: at the end of the warmup, only the steps the budget allows
    log_every: int
    eval_every: int
    prng_impl: str  # jax_default_prng_impl; "" = JAX's default
    peak_flops_per_device: float  # for MFU; 0 = look the device kind up
    bleu_every: int = 0  # translation on real data: sacreBLEU every N steps (0 = never)
    decode: DecodeConfig | None = None  # translation on real data
    # data.batching="stream": the Transformer-XL memory length of evaluation, which may exceed
    # model.memory_length (the parameters do not depend on it); None = model.memory_length.
    eval_memory_length: int | None = None

    @classmethod
    def from_dict(cls, config: Mapping, *, strict: bool = True) -> "TrainConfig":
        return _Reader(strict).train_config(config)

    @property
    def eval_memory(self) -> int:
        """The Transformer-XL memory length that stream evaluation uses (0 = none)."""
        return self.model.memory_length if self.eval_memory_length is None else self.eval_memory_length

    def model_config(self, text_vocab_size: int | None = None) -> ModelConfig:
        """The model for a text vocabulary of `text_vocab_size` ids (default: data.vocab_size)."""
        if text_vocab_size is None:
            return self.model
        return self.model.replace(vocab_size=model_vocab_size(self.objective, text_vocab_size))


def model_vocab_size(objective: str, text_vocab_size: int) -> int:
    """MLM models have one more output than the text has ids: [MASK] (see `transformer.tokens`)."""
    return tokens.mlm_vocab_size(text_vocab_size) if objective == "mlm" else text_vocab_size


def as_train_config(config) -> TrainConfig:
    """`config` as a TrainConfig (converting a ConfigDict; a TrainConfig passes through)."""
    return config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)


# ---------------------------------------------------------------------------------------------
# The reader: every leaf is taken once; what is left over is an unknown field.


class _Reader:
    def __init__(self, strict: bool):
        self.strict = strict

    def fail(self, path: str, message: str, *value):
        """Raises "config.<path>=<value> <message>" (or "config.<path> <message>" with no value)."""
        raise ConfigError(f"config.{path}={value[0]!r} {message}" if value else f"config.{path} {message}")

    def section(self, config: Mapping, path: str) -> dict:
        value = config.get(path.rsplit(".", 1)[-1]) if path else config
        if value is None or not hasattr(value, "items"):
            self.fail(path, "is missing")
        return dict(value.items())

    def take(self, fields: dict, path: str, kind, *, required: bool = True, choices=None):
        """Pops `fields[name]` (path `path`), checked to be a `kind` (and one of `choices`)."""
        name = path.rsplit(".", 1)[-1]
        if name not in fields:
            self.fail(path, "is missing")
        value = fields.pop(name)
        if value is None or value == () or value == []:
            if required:
                self.fail(path, "must be set")
            return None if value is None else ()
        if kind is tuple:
            return tuple(value)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(path, f"is not a {kind.__name__}", value)
        if choices is not None and value not in choices:
            self.fail(path, f"is not one of {list(choices)}", value)
        return value

    def inapplicable(self, fields: dict, path: str, reason: str):
        """Pops a leaf that cannot apply: it must be unset (None, (), "", 0 or False)."""
        value = fields.pop(path.rsplit(".", 1)[-1], None)
        if value not in (None, (), [], "", 0, False):
            if self.strict:
                # A config file's value cannot be set to None from a flag; the unset values above can.
                unset = {bool: "False", str: "''", tuple: "'()'", list: "'()'"}.get(type(value), "0")
                self.fail(path, f"has no effect: it applies only {reason}. Leave it unset (on the command "
                          f"line: --config.{path}={unset}).", value)
            logging.warning("config.%s=%r ignored: it applies only %s.", path, value, reason)
        return None

    def done(self, fields: dict, path: str):
        if fields:
            self.fail(path or "<root>", f"has unknown field(s) {sorted(fields)}")

    # --- sections

    def train_config(self, config: Mapping) -> TrainConfig:
        f = self.section(config, "")
        f.setdefault("fit_steps_to_budget", False)  # absent from the config.json of older runs
        objective = self.take(f, "objective", str, choices=OBJECTIVES)
        data = self.data(self.section(config, "data"), objective)
        top = dict(
            seed=self.take(f, "seed", int), objective=objective,
            label_smoothing=self.take(f, "label_smoothing", float), dropout=self.take(f, "dropout", bool),
            num_train_steps=self.take(f, "num_train_steps", int),
            max_train_minutes=self.take(f, "max_train_minutes", float, required=False) or 0.0,
            fit_steps_to_budget=bool(self.take(f, "fit_steps_to_budget", bool, required=False)),
            log_every=self.take(f, "log_every", int), eval_every=self.take(f, "eval_every", int),
            prng_impl=self.take(f, "prng_impl", str, required=False, choices=PRNG_IMPLS) or "",
            peak_flops_per_device=self.take(f, "peak_flops_per_device", float, required=False) or 0.0)
        for name in ("num_train_steps", "log_every", "eval_every"):
            if top[name] <= 0:
                self.fail(name, "must be positive", top[name])
        for name in ("max_train_minutes", "peak_flops_per_device"):
            if top[name] < 0:
                self.fail(name, "must be >= 0 (0 = none)", top[name])
        if not 0.0 <= top["label_smoothing"] < 1.0:
            self.fail("label_smoothing", "is outside [0, 1)", top["label_smoothing"])
        bleu = objective == "translation" and not data.synthetic
        if bleu:
            top["bleu_every"] = self.take(f, "bleu_every", int, required=False) or 0
            if top["bleu_every"] % top["eval_every"]:
                self.fail("bleu_every", f"is not a multiple of eval_every={top['eval_every']}", top["bleu_every"])
            top["decode"] = self.decode(self.section(config, "decode"))
        else:
            self.inapplicable(f, "bleu_every", "to translation on real data")
            decode = self.section(config, "decode")
            for name in list(decode):
                self.inapplicable(decode, f"decode.{name}", "to translation on real data")
            self.done(decode, "decode")
        f.pop("decode", None)
        optimizer = self.optimizer(self.section(config, "optimizer"), top["num_train_steps"])
        if top["fit_steps_to_budget"] and top["max_train_minutes"]:  # without a budget there is nothing to fit
            reads_total = "total_steps" in schedules.config_fields(optimizer.schedule)
            if not reads_total or (optimizer.warmup_steps or 0) < FIT_MIN_WARMUP:
                self.fail("fit_steps_to_budget", "needs a schedule that reads num_train_steps, with a warmup of at "
                          f"least {FIT_MIN_WARMUP} steps (the step rate is measured during the warmup), e.g. "
                          "optimizer.schedule='cosine'; or max_train_minutes=0 (no budget to fit)", True)
        model = self.model(self.section(config, "model"), objective, model_vocab_size(objective, data.vocab_size))
        top["eval_memory_length"] = self.memory(f, model, data, optimizer)
        run = TrainConfig(**top, model=model, data=data, optimizer=optimizer,
                          checkpoint=self.checkpoint(self.section(config, "checkpoint")),
                          mesh=self.mesh(self.section(config, "mesh")))
        for name in ("data", "optimizer", "model", "checkpoint", "mesh"):
            f.pop(name)
        self.done(f, "")
        return run

    def data(self, f: dict, objective: str) -> DataConfig:
        p = lambda name: f"data.{name}"  # noqa: E731
        name = self.take(f, p("name"), str)
        out = dict(name=name, vocab_size=self.take(f, p("vocab_size"), int),
                   max_length=self.take(f, p("max_length"), int), eval_batch_size=self.take(f, p("eval_batch_size"), int))
        f.setdefault("text_feature", None)  # absent from the config.json of older runs
        f.setdefault("lowercase", None)  # likewise (older runs kept case)
        f.setdefault("subword_samples", None)  # likewise (older runs always took the best segmentation)
        f.setdefault("subword_alpha", None)
        real = ("train_split", "eval_split", "data_dir", "manual_dir", "tokenizer", "batching")
        if name == "synthetic":
            out["batch_size"] = self.take(f, p("batch_size"), int)
            out["eval_batches"] = self.take(f, p("eval_batches"), int)
            if objective == "translation":
                out["task"] = self.take(f, p("task"), str, choices=synthetic.TASKS)
            else:
                self.inapplicable(f, p("task"), "to synthetic translation")
            if objective == "lm":  # the Markov-chain text, as rows or as one stream
                out["batching"] = self.take(f, p("batching"), str, required=False, choices=("stream",))
            else:
                self.inapplicable(f, p("batching"), "to real data, and to synthetic 'lm' data (as 'stream')")
            real = real[:-1]
            for leaf in real + ("tokens_per_batch", "source_lang", "target_lang", "text_feature", "lowercase",
                                "subword_samples", "subword_alpha"):
                self.inapplicable(f, p(leaf), "to real data")
        else:
            for leaf in ("task", "eval_batches"):
                self.inapplicable(f, p(leaf), "to synthetic data")
            out.update(train_split=self.take(f, p("train_split"), str), eval_split=self.take(f, p("eval_split"), str),
                       data_dir=self.take(f, p("data_dir"), str, required=False) or None,
                       manual_dir=self.take(f, p("manual_dir"), str, required=False) or None,
                       tokenizer=self.take(f, p("tokenizer"), str, choices=TOKENIZER_TYPES),
                       batching=self.take(f, p("batching"), str, choices=BATCHINGS),
                       lowercase=bool(self.take(f, p("lowercase"), bool, required=False)))
            if out["batching"] == "stream" and objective != "lm":
                self.fail(p("batching"), f"applies only to objective 'lm' (one token stream), not {objective!r}",
                          "stream")
            if out["batching"] == "bucket":
                out["tokens_per_batch"] = self.take(f, p("tokens_per_batch"), int)
                self.inapplicable(f, p("batch_size"), "to 'pad' and 'pack' batching and synthetic data "
                                  "(bucketing sizes batches by data.tokens_per_batch)")
            else:
                out["batch_size"] = self.take(f, p("batch_size"), int)
                self.inapplicable(f, p("tokens_per_batch"), "to data.batching='bucket'")
            if objective == "translation":
                out.update(source_lang=self.take(f, p("source_lang"), str),
                           target_lang=self.take(f, p("target_lang"), str))
                self.inapplicable(f, p("text_feature"), "to language modelling (objective 'lm' or 'mlm')")
            else:
                for leaf in ("source_lang", "target_lang"):
                    self.inapplicable(f, p(leaf), "to translation")
                out["text_feature"] = self.take(f, p("text_feature"), str, required=False)
            self.subword_sampling(f, out)
        for leaf in ("vocab_size", "max_length", "eval_batch_size", "batch_size", "eval_batches", "tokens_per_batch"):
            if out.get(leaf) is not None and out[leaf] <= 0:
                self.fail(p(leaf), "must be positive", out[leaf])
        self.done(f, "data")
        return DataConfig(**out)

    def subword_sampling(self, f: dict, out: dict):
        """data.subword_samples / subword_alpha of real data, into `out`."""
        p = lambda name: f"data.{name}"  # noqa: E731
        if out["batching"] == "stream":
            for leaf in ("subword_samples", "subword_alpha"):
                self.inapplicable(f, p(leaf), "to batching 'pad', 'bucket' and 'pack' (sentences, not one stream)")
            return
        samples = self.take(f, p("subword_samples"), int, required=False) or 0
        if samples == 0:
            self.inapplicable(f, p("subword_alpha"), "with data.subword_samples >= 2")
            return
        if samples < 2:
            self.fail(p("subword_samples"), "must be 0 (always the best segmentation) or at least 2 (candidates to "
                      "draw from; Kudo's setting: 64)", samples)
        if out["tokenizer"] != "unigram":
            self.fail(p("subword_samples"), f"needs data.tokenizer='unigram' (segmentation probabilities), not "
                      f"{out['tokenizer']!r}", samples)
        alpha = self.take(f, p("subword_alpha"), float)
        if alpha <= 0:
            self.fail(p("subword_alpha"), "must be positive (P(x) ** alpha; Kudo's setting: 0.1)", alpha)
        out.update(subword_samples=samples, subword_alpha=alpha)

    def optimizer(self, f: dict, num_train_steps: int) -> OptimizerConfig:
        p = lambda name: f"optimizer.{name}"  # noqa: E731
        schedule = self.take(f, p("schedule"), str, choices=tuple(schedules.CONFIG_BUILDERS))
        out = dict(schedule=schedule, learning_rate=self.take(f, p("learning_rate"), float),
                   grad_accum_steps=self.take(f, p("grad_accum_steps"), int))
        for name in ("b1", "b2", "eps", "weight_decay", "clip_grad_norm"):
            out[name] = self.take(f, p(name), float)
        if out["grad_accum_steps"] <= 0:
            self.fail(p("grad_accum_steps"), "must be positive", out["grad_accum_steps"])
        f.setdefault("ema_decay", 0.0)  # absent from the config.json of older runs (they kept no average)
        out["ema_decay"] = self.take(f, p("ema_decay"), float, required=False) or 0.0
        if not 0.0 <= out["ema_decay"] < 1.0:
            self.fail(p("ema_decay"), "must be in [0, 1) (0 = no moving average; e.g. 0.999)", out["ema_decay"])
        reads = schedules.config_fields(schedule)
        kinds = dict(warmup_steps=int, cycle_steps=tuple, cycle_lr_scales=tuple, cycle_warmup_steps=tuple)
        for name, kind in kinds.items():
            if name in reads:
                out[name] = self.take(f, p(name), kind)
            else:
                self.inapplicable(f, p(name), f"to the schedules that use it, not to {schedule!r}")
        if "cycle_steps" in reads:
            cycles = len(out["cycle_steps"])
            for name in CYCLE_FIELDS[1:]:
                if len(out[name]) != cycles:
                    self.fail(p(name), f"has {len(out[name])} entries; cycle_steps has {cycles}", out[name])
            if sum(out["cycle_steps"]) != num_train_steps:
                self.fail(p("cycle_steps"), f"sum to {sum(out['cycle_steps'])}, not to num_train_steps={num_train_steps}",
                          out["cycle_steps"])
        elif out.get("warmup_steps") is not None and "total_steps" in reads and out["warmup_steps"] >= num_train_steps:
            self.fail(p("warmup_steps"), f"must be < num_train_steps={num_train_steps}", out["warmup_steps"])
        self.done(f, "optimizer")
        return OptimizerConfig(**out)

    def model(self, f: dict, objective: str, vocab_size: int) -> ModelConfig:
        if "vocab_size" in f:  # written by older versions into config.json; the data sets it
            value = f.pop("vocab_size")
            if self.strict and value is not None:
                self.fail("model.vocab_size", "is set by the data (data.vocab_size, or the tokenizer's size)")
        preset = self.take(f, "model.preset", str)
        num_layers = self.take(f, "model.num_layers", int, required=False)
        overrides = {k: v for k, v in f.items() if v is not None}
        if num_layers is not None:
            for side in _model_sides(objective):
                overrides[f"num_{side}_layers"] = num_layers  # the shortcut wins over the per-stack depths
        try:
            model = ModelConfig.preset(preset, vocab_size=vocab_size, **overrides)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config.model: {e}") from e
        unused = dict(num_encoder_layers="to objectives with an encoder (translation, mlm)",
                      num_decoder_layers="to objectives with a decoder (translation, lm)")
        for side in ("encoder", "decoder"):
            if side not in _model_sides(objective):
                self.inapplicable(overrides, f"model.num_{side}_layers", unused[f"num_{side}_layers"])
        if objective != "translation":
            self.inapplicable(overrides, "model.share_embeddings", "to translation (one vocabulary for both sides)")
        self.kernel_options(overrides, model)
        return model

    def kernel_options(self, overrides: dict, model: ModelConfig) -> None:
        """Refuses the model fields of a position scheme or attention kernel the model does not use."""
        if model.position != "relative":
            for name in ("relative_num_buckets", "relative_max_distance"):
                self.inapplicable(overrides, f"model.{name}", "to model.position='relative'")
        if model.attention != "chunked":
            self.inapplicable(overrides, "model.attention_chunk_size", "to model.attention='chunked'")

    def memory(self, f: dict, model: ModelConfig, data: DataConfig, optimizer: OptimizerConfig) -> int | None:
        """Transformer-XL: checks model.memory_length against the data and reads eval_memory_length."""
        f.setdefault("eval_memory_length", None)  # absent from the config.json of older runs
        stream = data.batching == "stream"
        if model.memory_length and not stream:
            self.fail("model.memory_length", "needs data.batching='stream' (objective 'lm'): the memory carries "
                      "consecutive segments of one stream per row, which other batches are not", model.memory_length)
        if model.memory_length and optimizer.grad_accum_steps != 1:
            self.fail("optimizer.grad_accum_steps", "must be 1 with a Transformer-XL memory (model.memory_length > 0): "
                      "micro-batches would split the memory's rows", optimizer.grad_accum_steps)
        if not stream:
            return self.inapplicable(f, "eval_memory_length", "to data.batching='stream'")
        length = self.take(f, "eval_memory_length", int, required=False)
        if length is not None and length < 0:
            self.fail("eval_memory_length", "must be >= 0 (0 = no memory; unset = model.memory_length)", length)
        if length:
            try:
                model.replace(memory_length=length)
            except ValueError as e:
                self.fail("eval_memory_length", f"does not suit the model: {e}", length)
        return length

    def decode(self, f: dict) -> DecodeConfig:
        f.setdefault("length_penalty", "gnmt")  # absent from the config.json of older runs
        kinds = dict(beam_size=int, alpha=float, length_penalty=str, batch_size=int, bleu_sentences=int)
        out = DecodeConfig(**{name: self.take(f, f"decode.{name}", kind, choices=LENGTH_PENALTIES if
                                              name == "length_penalty" else None) for name, kind in kinds.items()})
        for name in ("beam_size", "batch_size"):
            if getattr(out, name) <= 0:
                self.fail(f"decode.{name}", "must be positive", getattr(out, name))
        self.done(f, "decode")
        return out

    def checkpoint(self, f: dict) -> CheckpointConfig:
        out = CheckpointConfig(every=self.take(f, "checkpoint.every", int), keep=self.take(f, "checkpoint.keep", int),
                               best_metric=self.take(f, "checkpoint.best_metric", str, required=False) or None,
                               best_mode=self.take(f, "checkpoint.best_mode", str, choices=("min", "max")))
        for name in ("every", "keep"):
            if getattr(out, name) <= 0:
                self.fail(f"checkpoint.{name}", "must be positive", getattr(out, name))
        self.done(f, "checkpoint")
        return out

    def mesh(self, f: dict) -> MeshConfig:
        out = MeshConfig(**{name: self.take(f, f"mesh.{name}", int) for name in ("data", "fsdp", "tensor")})
        for name, size in dataclasses.asdict(out).items():
            if size == 0 or size < -1:
                self.fail(f"mesh.{name}", "must be positive, or -1 for the devices the other axes leave", size)
        self.done(f, "mesh")
        return out


def _model_sides(objective: str) -> tuple[str, ...]:
    return {"translation": ("encoder", "decoder"), "lm": ("decoder",), "mlm": ("encoder",)}[objective]

