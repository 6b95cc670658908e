"""What the decoding benchmarks share: a trained translation run and a split's texts."""

import os

from experiments import cli
from transformer import inference, inputs


def load_translation_run(workdir: str, split: str):
    """A trained translation run's parameters ("averaged" checkpoint if there is one, else "latest")
    and `split`'s texts: (run, trainer, params, tokenizer, sources, references, a line saying which)."""
    checkpoint = "averaged" if os.path.isdir(os.path.join(workdir, "averaged")) else "latest"
    run, trainer, params, tokenizer, step = inference.load_for_inference(workdir, checkpoint)
    if run.objective != "translation" or tokenizer is None:
        raise cli.UserError(f"{workdir} is not a translation run on real data.")
    sources, references = inputs.eval_inputs(run, tokenizer, split).eval_texts
    where = f"{workdir} ({checkpoint} step {step}), {split}: {len(sources)} sentences"
    return run, trainer, params, tokenizer, sources, references, where
