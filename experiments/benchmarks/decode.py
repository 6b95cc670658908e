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
`--encoder_keys=shared,per_beam` times beam search with the encoder's cached keys and values kept
once per sentence, the W beams attending to them as W queries (ours), and repeated for each beam,
as before (and as the usual implementations do). `--beam_keys=mapped,moved` times beam search
with each layer's keys left where each beam wrote them and a row map reordered
(`decoding.add_beam_rows`, ours) and with the keys themselves moved at every step, as before (and as
the usual implementations do).
"""

import contextlib
import itertools
import time
from unittest import mock

import jax
from absl import flags

from experiments import cli
from experiments.benchmarks import trained_run
from transformer import attention, decoding, evaluation
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
_ENCODER_KEYS = flags.DEFINE_list("encoder_keys", ["shared"], "Beam search's cached encoder keys and values: "
                                  "shared (one copy per sentence) and/or per_beam (repeated for each beam, as before).")
_BEAM_KEYS = flags.DEFINE_list("beam_keys", ["mapped"], "Beam search's reordering of the decoder's cached keys: mapped "
                               "(a row map is reordered, the keys stay) and/or moved (the keys move, as before).")


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
def per_beam_encoder_keys():
    """Beam search as before: the encoder's output and inputs repeated for each beam, so that each
    beam row caches and reads its own copy of the encoder's keys and values."""
    def translate(model, params, inputs, *, eos_id, beam_size=4, alpha=0.6, max_extra_length=50, penalty="gnmt"):
        if beam_size == 1:
            return original(model, params, inputs, eos_id=eos_id, beam_size=1, max_extra_length=max_extra_length)
        batch, max_length = inputs.shape[0], inputs.shape[1] + max_extra_length
        encoded = model.apply({"params": params}, inputs, method=model.encode)
        encoded, inputs = decoding.expand_beams(encoded, beam_size), decoding.expand_beams(inputs, beam_size)
        cache = decoding.init_cache(model, params, max_length, batch * beam_size, encoded, inputs)
        step = decoding.encoder_decoder_step_fn(model, params, encoded, inputs)
        return decoding.beam_search(step, cache, batch, beam_size, max_length, eos_id, alpha, penalty)[0][:, 0]

    original = decoding.translate
    with mock.patch.object(decoding, "translate", translate):
        yield


@contextlib.contextmanager
def moved_keys():
    """Beam search as before: no row map, so each reordering moves the keys and values written so far."""
    with mock.patch.object(decoding, "add_beam_rows", lambda cache, batch_size, beam_size: cache):
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
                                  ("top_k", _TOP_K.value, ("chunked", "full")),
                                  ("encoder_keys", _ENCODER_KEYS.value, ("shared", "per_beam")),
                                  ("beam_keys", _BEAM_KEYS.value, ("mapped", "moved"))):
        if set(values) - set(allowed):
            raise cli.UserError(f"--{name}={','.join(values)}: use {' and/or '.join(allowed)}.")
    workdir = _WORKDIR.value
    run, trainer, params, tokenizer, sources, references, where = trained_run.load_translation_run(
        workdir, _SPLIT.value)
    print(f"{time.strftime('%Y-%m-%d')}: {where}; JAX {jax.__version__} on {jax.devices()[0].device_kind}")
    print("| dtype | beam | cache | top-k | encoder keys | beam keys | batch | sentences/s | compile s | BLEU lc | "
          "BLEU cased |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for dtype in _DTYPES.value:
        model = EncoderDecoder(trainer.model.config.replace(dtype=dtype))
        for beam in (int(b) for b in _BEAMS.value):
            beam_only = (lambda values: values) if beam > 1 else (lambda values: ["-"])
            for cache, top_k, keys, beam_keys in itertools.product(_CACHES.value, beam_only(_TOP_K.value),
                                                                   beam_only(_ENCODER_KEYS.value),
                                                                   beam_only(_BEAM_KEYS.value)):
                with (trainer.context(), whole_cache() if cache == "whole" else contextlib.nullcontext(),
                      full_top_k() if top_k == "full" else contextlib.nullcontext(),
                      per_beam_encoder_keys() if keys == "per_beam" else contextlib.nullcontext(),
                      moved_keys() if beam_keys == "moved" else contextlib.nullcontext()):
                    translator = evaluation.Translator.from_config(
                        model, tokenizer, run.decode, max_input_length=run.data.max_length,
                        sharding=trainer.batch_sharding, beam_size=beam, batch_size=_BATCH.value)
                    _, first = timed_pass(translator, params, sources)
                    hypotheses, second = timed_pass(translator, params, sources)
                cased, _ = evaluation.bleu(hypotheses, references)
                lowercased, _ = evaluation.bleu(hypotheses, references, lowercase=True)
                print(f"| {dtype} | {beam} | {cache} | {top_k} | {keys} | {beam_keys} | {translator.batch_size} | "
                      f"{len(sources) / second:.1f} | {max(first - second, 0.0):.1f} | {lowercased:.2f} | "
                      f"{cased:.2f} |", flush=True)


if __name__ == "__main__":
    cli.run(main)
