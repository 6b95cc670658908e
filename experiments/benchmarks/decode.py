"""Translation speed of a trained run: greedy and beam search, sentences/s, with compile time apart.

    python -m experiments.benchmarks.decode --workdir=runs/multi30k_hour
    python -m experiments.benchmarks.decode --workdir=runs/multi30k_hour --beam_sizes=5 --dtypes=float32,bfloat16

For each compute dtype and beam size, the split is translated twice with the same Translator: the
first pass compiles one program per length bucket and decodes; the second only decodes. The
second pass gives sentences/s; the difference between the two is the compile time. BLEU
(sacreBLEU, cased and lowercased) is of the second pass, so a faster setting is seen to be
equally good. Parameters are the run's ("averaged" checkpoint if there is one, else "latest").

`--caches=live,whole` times decoding both ways in one run: "live" (ours) reads only the cache
positions written so far in self-attention, and moves only those when beams are reordered;
"whole" reads and moves the whole cache (source length + 50 positions) at every step, as before
(and as the usual implementations do). `--top_k=chunked,full` likewise times beam search's top-k
over beam x vocabulary both ways: `decoding.chunked_top_k` (ours) and `jax.lax.top_k` over all of it.
"""

import contextlib
import itertools
import os
import time
from unittest import mock

import jax
from absl import flags

from experiments import cli
from transformer import attention, decoding, evaluation, inference, inputs
from transformer.models import EncoderDecoder

_WORKDIR = flags.DEFINE_string("workdir", None, "A translation run's workdir.", required=True)
_SPLIT = flags.DEFINE_string("split", "test", "Which split to translate.")
_BEAMS = flags.DEFINE_list("beam_sizes", ["1", "5"], "Beam sizes (1 = greedy).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes (parameters stay float32).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Sentences per batch (default: the run's decode.batch_size).")
_CACHES = flags.DEFINE_list("caches", ["live"], "Cache positions each step reads and reorders: live (those "
                            "written so far) and/or whole (all of them, as before).")
_TOP_K = flags.DEFINE_list("top_k", ["chunked"], "Beam search's top-k over beam x vocabulary: chunked "
                           "(decoding.chunked_top_k) and/or full (jax.lax.top_k over all candidates, as before).")


@contextlib.contextmanager
def whole_cache():
    """Decoding as before: attention reads, and beam reordering moves, every cache position."""
    kernel = attention.dot_product_attention

    def without_kv_length(*args, kv_length=None, **kwargs):
        return kernel(*args, **kwargs)

    with (mock.patch.object(decoding, "written_positions", lambda cache: None),
          mock.patch.object(attention, "dot_product_attention", without_kv_length)):
        yield


@contextlib.contextmanager
def full_top_k():
    """Beam search's top-k as before: `jax.lax.top_k` over all beam x vocabulary candidates."""
    with mock.patch.object(decoding, "chunked_top_k", lambda x, k: jax.lax.top_k(x, k)):
        yield


def timed_pass(translator, params, sources):
    start = time.perf_counter()
    hypotheses = translator(params, sources)
    return hypotheses, time.perf_counter() - start


def main(argv):
    del argv
    for name, values, allowed in (("caches", _CACHES.value, ("live", "whole")),
                                  ("top_k", _TOP_K.value, ("chunked", "full"))):
        if set(values) - set(allowed):
            raise cli.UserError(f"--{name}={','.join(values)}: use {' and/or '.join(allowed)}.")
    workdir = _WORKDIR.value
    checkpoint = "averaged" if os.path.isdir(os.path.join(workdir, "averaged")) else "latest"
    run, trainer, params, tokenizer, step = inference.load_for_inference(workdir, checkpoint)
    if run.objective != "translation" or tokenizer is None:
        raise cli.UserError(f"{workdir} is not a translation run on real data.")
    sources, references = inputs.eval_inputs(run, tokenizer, _SPLIT.value).eval_texts
    print(f"{time.strftime('%Y-%m-%d')}: {workdir} ({checkpoint} step {step}), {_SPLIT.value}: {len(sources)} "
          f"sentences; JAX {jax.__version__} on {jax.devices()[0].device_kind}")
    print("| dtype | beam | cache | top-k | batch | sentences/s | compile s | BLEU lc | BLEU cased |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for dtype in _DTYPES.value:
        model = EncoderDecoder(trainer.model.config.replace(dtype=dtype))
        for beam in (int(b) for b in _BEAMS.value):
            for cache, top_k in itertools.product(_CACHES.value, _TOP_K.value if beam > 1 else ["-"]):
                translator = evaluation.Translator.from_config(
                    model, tokenizer, run.decode, max_input_length=run.data.max_length,
                    sharding=trainer.batch_sharding, beam_size=beam, batch_size=_BATCH.value)
                with (trainer.context(), whole_cache() if cache == "whole" else contextlib.nullcontext(),
                      full_top_k() if top_k == "full" else contextlib.nullcontext()):
                    _, first = timed_pass(translator, params, sources)
                    hypotheses, second = timed_pass(translator, params, sources)
                cased, _ = evaluation.bleu(hypotheses, references)
                lowercased, _ = evaluation.bleu(hypotheses, references, lowercase=True)
                print(f"| {dtype} | {beam} | {cache} | {top_k} | {translator.batch_size} | "
                      f"{len(sources) / second:.1f} | {max(first - second, 0.0):.1f} | {lowercased:.2f} | "
                      f"{cased:.2f} |", flush=True)


if __name__ == "__main__":
    cli.run(main)
