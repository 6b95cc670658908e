"""Translation speed of a trained run: greedy and beam search, sentences/s, with compile time apart.

    python -m experiments.benchmarks.decode --workdir=runs/multi30k_hour
    python -m experiments.benchmarks.decode --workdir=runs/multi30k_hour --beam_sizes=5 --dtypes=float32,bfloat16

For each compute dtype and beam size, the split is translated twice with the same Translator: the
first pass compiles one program per length bucket and decodes; the second only decodes. The
second pass gives sentences/s; the difference between the two is the compile time. BLEU
(sacreBLEU, cased and lowercased) is of the second pass, so a faster setting is seen to be
equally good. Parameters are the run's ("averaged" checkpoint if there is one, else "latest").
"""

import os
import time

import jax
from absl import flags

from experiments import cli
from transformer import evaluation, inference, inputs
from transformer.models import EncoderDecoder

_WORKDIR = flags.DEFINE_string("workdir", None, "A translation run's workdir.", required=True)
_SPLIT = flags.DEFINE_string("split", "test", "Which split to translate.")
_BEAMS = flags.DEFINE_list("beam_sizes", ["1", "5"], "Beam sizes (1 = greedy).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes (parameters stay float32).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Sentences per batch (default: the run's decode.batch_size).")


def timed_pass(translator, params, sources):
    start = time.perf_counter()
    hypotheses = translator(params, sources)
    return hypotheses, time.perf_counter() - start


def main(argv):
    del argv
    workdir = _WORKDIR.value
    checkpoint = "averaged" if os.path.isdir(os.path.join(workdir, "averaged")) else "latest"
    run, trainer, params, tokenizer, step = inference.load_for_inference(workdir, checkpoint)
    if run.objective != "translation" or tokenizer is None:
        raise cli.UserError(f"{workdir} is not a translation run on real data.")
    sources, references = inputs.eval_inputs(run, tokenizer, _SPLIT.value).eval_texts
    print(f"{time.strftime('%Y-%m-%d')}: {workdir} ({checkpoint} step {step}), {_SPLIT.value}: {len(sources)} "
          f"sentences; JAX {jax.__version__} on {jax.devices()[0].device_kind}")
    print("| dtype | beam | batch | sentences/s | compile s | BLEU lc | BLEU cased |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dtype in _DTYPES.value:
        model = EncoderDecoder(trainer.model.config.replace(dtype=dtype))
        for beam in (int(b) for b in _BEAMS.value):
            translator = evaluation.Translator.from_config(
                model, tokenizer, run.decode, max_input_length=run.data.max_length, sharding=trainer.batch_sharding,
                beam_size=beam, batch_size=_BATCH.value)
            with trainer.context():
                _, first = timed_pass(translator, params, sources)
                hypotheses, second = timed_pass(translator, params, sources)
            cased, _ = evaluation.bleu(hypotheses, references)
            lowercased, _ = evaluation.bleu(hypotheses, references, lowercase=True)
            print(f"| {dtype} | {beam} | {translator.batch_size} | {len(sources) / second:.1f} | "
                  f"{max(first - second, 0.0):.1f} | {lowercased:.2f} | {cased:.2f} |", flush=True)


if __name__ == "__main__":
    cli.run(main)
