"""Attention maps of a trained model on one sentence: PNG heatmaps and an index.html that shows them.

    python -m experiments.attention --workdir=DIR --text="A man rides a bike." [--checkpoint=averaged]
    python -m experiments.attention --workdir=DIR --tokens=5,9,12      # a run on synthetic data (no tokenizer)

A translation run translates the text (the run's beam search, or --beam_size=1 for greedy), then
runs the model once on (text, translation), teacher-forced, and draws the encoder self-attention,
decoder self-attention and encoder-decoder attention of every layer (a panel per head), plus their
alignment (the encoder-decoder attention averaged over all layers and heads). A language model (lm)
shows its decoder self-attention over the text, an MLM its encoder self-attention. Writes
<out>/index.html (default out: <workdir>/attention) and prints its path.
"""

import os

from absl import flags

from experiments import cli
from transformer import attention_maps, inference, runtime

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run.")
_TEXT = flags.DEFINE_string("text", None, "The sentence (a run with a SentencePiece vocabulary).")
_TOKENS = flags.DEFINE_list("tokens", None, "Token ids instead of --text, comma-separated (e.g. 5,9,12); EOS is "
                            "appended.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: <workdir>/attention).")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "latest", list(inference.CHECKPOINTS), "Which checkpoint to use.")
_STEP = flags.DEFINE_integer("step", None, "A saved step other than the newest.", lower_bound=0)
_BEAM = flags.DEFINE_integer("beam_size", None, "Translation: beam size (1 = greedy); default: the run's config.",
                             lower_bound=1, upper_bound=64)
flags.mark_flags_as_required(["workdir"])


def check_input(text: str | None, tokens: list[str] | None, synthetic: bool) -> None:
    """Refuses a missing or doubled input, and text for a run without a tokenizer, before anything loads."""
    if (text is None) == (tokens is None):
        raise cli.UserError("pass either --text=SENTENCE or --tokens=ID,ID,... (one of them).")
    if text is not None and synthetic:
        raise cli.UserError("--text: this run has no tokenizer (synthetic data); give token ids instead, "
                            "e.g. --tokens=5,9,12.")


def token_ids(text: str | None, tokens: list[str] | None, tokenizer, vocab_size: int) -> list[int]:
    """The ids of --text (SentencePiece) or --tokens, checked against the run's vocabulary."""
    if text is not None:
        ids = tokenizer.encode(text)
    else:
        try:
            ids = [int(t) for t in tokens]
        except ValueError:
            raise cli.UserError(f"--tokens={','.join(tokens)}: give integer token ids, e.g. --tokens=5,9,12.") from None
        bad = [i for i in ids if not 0 < i < vocab_size]
        if bad:
            raise cli.UserError(f"--tokens: ids {bad} are outside the vocabulary 1..{vocab_size - 1} (0 is padding).")
    if not ids:
        raise cli.UserError("the text has no tokens: give a non-empty --text or --tokens.")
    return ids


def main(argv):
    del argv
    runtime.initialize()
    workdir = _WORKDIR.value
    check_input(_TEXT.value, _TOKENS.value, inference.load_config(workdir).data.synthetic)
    run, trainer, params, tokenizer, step = inference.load_for_inference(workdir, _CHECKPOINT.value, _STEP.value)
    ids = token_ids(_TEXT.value, _TOKENS.value, tokenizer, trainer.model_cfg.vocab_size)
    page = attention_maps.write_report(
        run, trainer, params, tokenizer, ids, _OUT.value or os.path.join(workdir, "attention"),
        title=f"Attention maps: {workdir}", beam_size=_BEAM.value,
        notes=[f"A {run.objective} run, {_CHECKPOINT.value} checkpoint (step {step})."])
    print(page)


if __name__ == "__main__":
    cli.run(main)
