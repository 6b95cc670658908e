"""Score a trained translation model on a split: sacreBLEU (cased and lowercased) and perplexity.

    python -m experiments.evaluate --workdir=DIR --split=test_2016_flickr [--checkpoint=averaged]

Writes <workdir>/eval/<split>.<checkpoint>.txt (one translation per line) and .json (the scores).
"""

import json
import os

import jax
from absl import app, flags

from transformer import evaluation, training

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run.")
_SPLIT = flags.DEFINE_string("split", "validation", "Split of the run's dataset to score.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "latest", ["latest", "averaged"], "Which checkpoint to score.")
_BEAM = flags.DEFINE_integer("beam_size", None, "Beam size (1 = greedy); default: the run's config.")
_ALPHA = flags.DEFINE_float("alpha", None, "Length penalty; default: the run's config.")
flags.mark_flags_as_required(["workdir"])


def evaluate_split(workdir: str, split: str, checkpoint: str = "latest", beam_size=None, alpha=None) -> dict:
    from transformer import data  # noqa: PLC0415

    config, trainer, params, tokenizer, step = training.load_for_inference(workdir, checkpoint)
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


def main(argv):
    del argv
    result = evaluate_split(_WORKDIR.value, _SPLIT.value, _CHECKPOINT.value, _BEAM.value, _ALPHA.value)
    print(f"{result['split']} ({result['checkpoint']} checkpoint, step {result['step']}, "
          f"beam {result['beam_size']}): BLEU {result['bleu']:.2f}  lowercased BLEU {result['bleu_lc']:.2f}  "
          f"perplexity {result['perplexity']:.2f}  ({result['sentences_per_s']:.1f} sentences/s)")
    print(f"sacreBLEU signature: {result['signature']}")
    print(f"sacreBLEU signature (lowercased): {result['signature_lc']}")


if __name__ == "__main__":
    app.run(main)
