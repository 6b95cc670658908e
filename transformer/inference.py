"""Using a trained workdir: restore for inference, average checkpoints, score a split.

Library counterparts of the `experiments.average`, `experiments.evaluate`, `experiments.translate`
and `experiments.sample` commands.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import logging

from transformer import checkpointing, evaluation, sharding, training


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config the training run wrote into `workdir`."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: is {workdir} the workdir of a training run?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_for_inference(workdir: str, checkpoint: str = "latest"):
    """(config, trainer, params, tokenizer or None, step) from a workdir's "latest" or "averaged" checkpoint."""
    config = load_config(workdir)
    tokenizer = None
    vocab_size = config.data.vocab_size
    spm_path = os.path.join(workdir, "spm.model")
    if config.data.name != "synthetic":
        from transformer import data  # noqa: PLC0415

        tokenizer = data.load_tokenizer(spm_path)
        vocab_size = tokenizer.vocab_size
    trainer = training.Trainer(config, training.model_config(config, vocab_size), sharding.make_mesh(**config.mesh))
    directory = {"latest": "checkpoints", "averaged": "averaged"}.get(checkpoint)
    if directory is None:
        raise ValueError(f"checkpoint={checkpoint!r}: use 'latest' or 'averaged'.")
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, directory))
    try:
        if ckpt.latest_step() is None:
            hint = " (run experiments.average first)" if checkpoint == "averaged" else ""
            raise FileNotFoundError(f"No checkpoint in {ckpt.directory}{hint}.")
        state, _, step = ckpt.restore(trainer.abstract_state)
    finally:
        ckpt.close()
    return config, trainer, state.params, tokenizer, step


def average_checkpoints(workdir: str, num_checkpoints: int) -> tuple[list[int], str]:
    """Averages the last `num_checkpoints` of `workdir` into `workdir/averaged`; returns (steps, directory)."""
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


def evaluate_split(workdir: str, split: str, checkpoint: str = "latest", beam_size=None, alpha=None) -> dict:
    from transformer import data  # noqa: PLC0415

    config, trainer, params, tokenizer, step = load_for_inference(workdir, checkpoint)
    if config.objective != "translation" or tokenizer is None:
        raise ValueError("experiments.evaluate scores translation runs on real data.")
    source = data.load_translation_split(
        config.data.name, split, source_lang=config.data.source_lang, target_lang=config.data.target_lang,
        data_dir=config.data.data_dir or None, manual_dir=config.data.manual_dir or None)
    examples = [source[i] for i in range(len(source))]
    beam_size = beam_size or config.decode.beam_size
    translator = evaluation.Translator(
        trainer.model, tokenizer, beam_size=beam_size,
        alpha=config.decode.alpha if alpha is None else alpha, batch_size=config.decode.batch_size,
        max_input_length=config.data.max_length, sharding=trainer.batch_sharding)
    with trainer.context():
        scores = evaluation.evaluate_translations(
            translator, params, [e["source"] for e in examples], [e["target"] for e in examples])
    # Per-token perplexity with teacher forcing on the same split.
    config.data.eval_split = split
    inputs = training.make_inputs(config, workdir)
    loss = training.evaluate(trainer, params, inputs.eval_batches())
    hypotheses = scores.pop("hypotheses")
    result = dict(split=split, checkpoint=checkpoint, step=step, beam_size=beam_size,
                  **scores, perplexity=loss["perplexity"], loss=loss["loss"])
    if jax.process_index() == 0:
        out_dir = os.path.join(workdir, "eval")
        os.makedirs(out_dir, exist_ok=True)
        stem = os.path.join(out_dir, f"{split}.{checkpoint}")
        with open(stem + ".txt", "w") as f:
            f.write("\n".join(hypotheses) + "\n")
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=2)
    return result
