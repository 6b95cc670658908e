"""Using a trained workdir: restore for inference, average checkpoints, score a split.

Library counterparts of the `experiments.average`, `experiments.evaluate`, `experiments.translate`
and `experiments.sample` commands.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections
from absl import logging

from transformer import checkpointing, evaluation, inputs, optimizers, runtime, sharding, training
from transformer import workdir as workdir_lib
from transformer.run_config import TrainConfig


def load_config(workdir: str) -> TrainConfig:
    """The validated config of the training run in `workdir` (from the config.json it wrote).

    Leaves that older versions wrote but that have no effect are dropped with a warning.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: is {workdir} the workdir of a training run?")
    with open(path) as f:
        return TrainConfig.from_dict(ml_collections.ConfigDict(json.load(f)), strict=False)


# Which parameters of a workdir: the newest training checkpoint's, the averaged checkpoint's
# (`average_checkpoints`), or the moving average kept in the training checkpoint's optimizer state
# (runs with optimizer.ema_decay > 0).
CHECKPOINTS = ("latest", "averaged", "ema")


def load_for_inference(workdir: str, checkpoint: str = "latest", step: int | None = None):
    """(config, trainer, params, tokenizer or None, step) from a workdir's checkpoint (one of CHECKPOINTS).

    `step` picks another saved step than the newest. `config` is the run's TrainConfig. The PRNG
    implementation becomes the run's (its checkpoints hold keys of that implementation). A damaged
    checkpoint raises CheckpointError naming its step and the other steps there are.
    """
    run = load_config(workdir)
    runtime.use_prng_impl(run.prng_impl)
    tokenizer = None
    vocab_size = run.data.vocab_size
    if not run.data.synthetic:
        from transformer import data  # noqa: PLC0415

        tokenizer = data.load_tokenizer(os.path.join(workdir, "spm.model"))
        vocab_size = tokenizer.vocab_size
    mesh = sharding.make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor)
    trainer = training.Trainer(run, run.model_config(vocab_size), mesh)
    directory = {"latest": "checkpoints", "averaged": "averaged", "ema": "checkpoints"}.get(checkpoint)
    if directory is None:
        raise ValueError(f"checkpoint={checkpoint!r}: use one of {', '.join(map(repr, CHECKPOINTS))}.")
    if checkpoint == "ema" and not run.optimizer.ema_decay:
        raise ValueError(f"checkpoint='ema': the run in {workdir} kept no moving average of its parameters "
                         "(optimizer.ema_decay is 0).")
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, directory))
    try:
        if ckpt.latest_step() is None:
            hint = " (run experiments.average first)" if checkpoint == "averaged" else ""
            raise FileNotFoundError(f"No checkpoint in {ckpt.directory}{hint}.")
        step = ckpt.latest_step() if step is None else step
        try:
            state = ckpt.restore_state(trainer.abstract_state, step)
        except checkpointing.CheckpointError as e:
            others = [s for s in ckpt.all_steps() if s != step]
            raise checkpointing.CheckpointError(
                f"{e}." + (f" Pass --step=N to use another of the saved steps {others}." if others else "")) from e
    finally:
        ckpt.close()
    params = optimizers.ema_params(state.opt_state) if checkpoint == "ema" else state.params
    return run, trainer, params, tokenizer, step


def average_checkpoints(workdir: str, num_checkpoints: int) -> tuple[list[int], str]:
    """Averages the last `num_checkpoints` of `workdir` into `workdir/averaged`; returns (steps, directory)."""
    if num_checkpoints < 1:
        raise ValueError(f"num_checkpoints={num_checkpoints}: average at least one checkpoint.")
    _, trainer, _, _, _ = load_for_inference(workdir)
    source = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
    steps = source.all_steps()[-num_checkpoints:]
    if len(steps) < num_checkpoints:
        logging.warning("Only %d checkpoints available (%s); averaging those.", len(steps), steps)
    state, step = checkpointing.average_params(source, trainer.abstract_state, steps)
    source.close()
    target = checkpointing.Checkpointer(os.path.join(workdir, "averaged"), keep=1)
    if step in target.all_steps():  # averaged before (maybe over other steps): replace it
        target.delete(step)
    target.save(step, state)
    target.close()
    return steps, target.directory


class SplitScorer:
    """A translation run's checkpoint restored once, scoring any of its splits with any decoding setting.

    Each split's inputs and teacher-forced perplexity are computed the first time it is scored and
    reused after that: choosing a length penalty on val and then decoding test restores the
    checkpoint once and reads each split once.
    """

    def __init__(self, workdir: str, checkpoint: str = "latest", step: int | None = None):
        self.run, self.trainer, self.params, self.tokenizer, self.step = load_for_inference(workdir, checkpoint, step)
        if self.run.objective != "translation" or self.tokenizer is None:
            raise workdir_lib.WorkdirError(
                f"{workdir} holds a {self.run.objective!r} run on {self.run.data.name!r} data: scoring needs a "
                "translation run on real data.")
        self.workdir, self.checkpoint = workdir, checkpoint
        self._inputs = {}  # split -> its inputs (tokenized once)
        self._losses = {}  # split -> teacher-forced loss of these parameters
        self._translators = {}  # beam size -> Translator: its compiled searches serve every alpha

    def sibling(self, checkpoint: str, step: int | None = None) -> SplitScorer:
        """A scorer of another checkpoint of the same run (e.g. "ema" beside "averaged") that shares this
        one's split inputs and compiled searches: scoring both costs the decoding, not new compiles."""
        other = SplitScorer(self.workdir, checkpoint, step)
        other._inputs, other._translators = self._inputs, self._translators
        return other

    def _split(self, split: str):
        if split not in self._inputs:  # the split alone, no training pipeline
            self._inputs[split] = inputs.eval_inputs(self.run, self.tokenizer, split)
        if split not in self._losses:  # per-token perplexity
            self._losses[split] = training.evaluate(self.trainer, self.params, self._inputs[split].eval_batches())
        return self._inputs[split], self._losses[split]

    def score(self, split: str, beam_size=None, alpha=None, tag: str = "") -> dict:
        """sacreBLEU (cased, lowercased) and perplexity on `split`, decoding with `beam_size` and
        `alpha` (None: the run's). Writes <workdir>/eval/<split>.<checkpoint>[.<tag>].txt (the
        translations) and .json (the scores)."""
        split_inputs, loss = self._split(split)
        translator = self._translator(beam_size)
        sources, references = split_inputs.eval_texts
        with self.trainer.context():
            scores = evaluation.evaluate_translations(translator, self.params, sources, references, alpha)
        return self._write(split, translator, self.run.decode.alpha if alpha is None else alpha, scores, loss, tag)

    def score_alphas(self, split: str, alphas, beam_size=None, tag="alpha{:g}") -> dict:
        """{alpha: `score(split, beam_size, alpha, tag.format(alpha))`} for each of `alphas`, from one beam
        search over the split (`evaluation.evaluate_alphas`): the same translations and scores as one
        `score` call per alpha, at about the cost of one."""
        split_inputs, loss = self._split(split)
        translator = self._translator(beam_size)
        sources, references = split_inputs.eval_texts
        with self.trainer.context():
            by_alpha = evaluation.evaluate_alphas(translator, self.params, sources, references, alphas)
        return {alpha: self._write(split, translator, alpha, scores, loss, tag.format(alpha))
                for alpha, scores in by_alpha.items()}

    def _translator(self, beam_size=None) -> evaluation.Translator:
        beam_size = beam_size or self.run.decode.beam_size
        if beam_size not in self._translators:
            self._translators[beam_size] = evaluation.Translator.from_config(
                self.trainer.model, self.tokenizer, self.run.decode, max_input_length=self.run.data.max_length,
                sharding=self.trainer.batch_sharding, beam_size=beam_size)
        return self._translators[beam_size]

    def _write(self, split: str, translator, alpha: float, scores: dict, loss: dict, tag: str) -> dict:
        scores = dict(scores)
        hypotheses = scores.pop("hypotheses")
        result = dict(split=split, checkpoint=self.checkpoint, step=self.step, beam_size=translator.beam_size,
                      alpha=alpha, **scores, perplexity=loss["perplexity"], loss=loss["loss"])
        if jax.process_index() == 0:
            out_dir = os.path.join(self.workdir, "eval")
            os.makedirs(out_dir, exist_ok=True)
            stem = os.path.join(out_dir, ".".join(filter(None, (split, self.checkpoint, tag))))
            with open(stem + ".txt", "w") as f:
                f.write("\n".join(hypotheses) + "\n")
            with open(stem + ".json", "w") as f:
                json.dump(result, f, indent=2)
        return result


def evaluate_split(workdir: str, split: str, checkpoint: str = "latest", beam_size=None, alpha=None,
                   step: int | None = None, tag: str = "") -> dict:
    """sacreBLEU (cased, lowercased) and teacher-forced perplexity of a translation run on `split`
    (`SplitScorer(workdir, checkpoint, step).score(split, beam_size, alpha, tag)`)."""
    return SplitScorer(workdir, checkpoint, step).score(split, beam_size, alpha, tag)


def evaluate_stream(workdir: str, eval_memory_lengths, split: str | None = None, checkpoint: str = "latest",
                    step: int | None = None) -> list[dict]:
    """Loss, perplexity and bits per token of a stream language model (data.batching="stream") on
    `split` (default: the run's eval split), read segment by segment with each Transformer-XL
    evaluation memory length in `eval_memory_lengths` (0 = none; the parameters do not depend on it)."""
    run, trainer, params, tokenizer, step = load_for_inference(workdir, checkpoint, step)
    if run.data.batching != "stream" or tokenizer is None:
        raise workdir_lib.WorkdirError(f"{workdir} holds a {run.objective!r} run with data.batching="
                                       f"{run.data.batching!r} on {run.data.name!r}: this needs a stream language "
                                       "model on real data (data.batching='stream').")
    split = split or run.data.eval_split
    split_inputs = inputs.stream_eval_inputs(run, tokenizer, split)
    results = []
    for length in eval_memory_lengths:
        evaluator = training.Trainer(dataclasses.replace(run, eval_memory_length=length), trainer.model_cfg,
                                     trainer.mesh)
        scores = training.evaluate(evaluator, params, split_inputs.eval_batches())
        results.append(dict(split=split, step=step, eval_memory_length=length, **scores))
    return results
