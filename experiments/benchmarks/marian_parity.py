"""Our model beside its Hugging Face MarianMT export: logits, greedy and beam outputs, BLEU and speed.

    python -m experiments.benchmarks.marian_parity --workdir=runs/multi30k_hour --checkpoint=averaged \
        --marian_dir=exports/multi30k_marian [--sentences=1000] [--beam_size=5] [--alpha=0.6] [--rounds=3]

Exports the run (unless --marian_dir already holds an export), then on test_2016_flickr:
  * logits: max |ours - Marian's| over real target positions of the references (teacher forcing),
    ours in float32 (`--dtype`; the export is float32);
  * greedy: the fraction of sentences whose translations are identical, and sentences/s on each side;
  * beam search with the same length penalty (ours `length_penalty="power"`, Hugging Face's
    `length_penalty=alpha`, `early_stopping="never"`): sacreBLEU on each side, identical outputs,
    sentences/s (ours after a first pass that compiles). Batches of --batch_size sentences, sorted
    by length, on both sides; torch uses --torch_threads threads (default: all cores, as JAX).
    The two sides alternate, --rounds times, and each side's median round counts, so that drift on
    a shared machine hits both alike.
"""

import gzip
import os
import statistics
import time

import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import cli
from transformer import evaluation, inference, marian, models

_WORKDIR = flags.DEFINE_string("workdir", None, "A translation run.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "averaged", list(inference.CHECKPOINTS), "Which checkpoint.")
_MARIAN_DIR = flags.DEFINE_string("marian_dir", None, "Where the export is (written if missing).")
_RAW_DIR = flags.DEFINE_string("raw_dir", os.path.join("..", "shared", "data", "multi30k"), "Multi30k raw files.")
_SENTENCES = flags.DEFINE_integer("sentences", 1000, "test_2016_flickr sentences to use.")
_BEAM = flags.DEFINE_integer("beam_size", 5, "Beam size.")
_ALPHA = flags.DEFINE_float("alpha", 0.6, "Length penalty exponent (power form on both sides).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Sentences per batch on both sides.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Our compute dtype.")
_THREADS = flags.DEFINE_integer("torch_threads", None, "torch threads (default: os.cpu_count()).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating timed rounds (ours, Marian, ours, ...); medians count.",
                               lower_bound=1)
flags.mark_flags_as_required(["workdir", "marian_dir"])


def read(name, limit):
    with gzip.open(os.path.join(_RAW_DIR.value, name), "rt", encoding="utf-8") as f:
        return f.read().splitlines()[:limit]


def hf_translate(model, tokenizer, sentences, batch_size, **kwargs):
    import torch  # noqa: PLC0415

    order = sorted(range(len(sentences)), key=lambda i: len(tokenizer(sentences[i])["input_ids"]))
    out = [""] * len(sentences)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = tokenizer([sentences[i] for i in rows], return_tensors="pt", padding=True)
        with torch.no_grad():
            generated = model.generate(**batch, max_new_tokens=batch["input_ids"].shape[1] + 50, do_sample=False,
                                       **kwargs)
        for i, row in zip(rows, generated):
            out[i] = tokenizer.decode(row, skip_special_tokens=True)
    return out


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main(argv):
    del argv
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    torch.set_num_threads(_THREADS.value or os.cpu_count())
    out = _MARIAN_DIR.value
    if not os.path.exists(os.path.join(out, "model.safetensors")):
        marian.export_workdir(_WORKDIR.value, out, _CHECKPOINT.value)
    run, trainer, params, tokenizer, step = inference.load_for_inference(_WORKDIR.value, _CHECKPOINT.value)
    cfg = trainer.model_cfg.replace(dtype=_DTYPE.value)
    model = models.EncoderDecoder(cfg)
    hf = transformers.MarianMTModel.from_pretrained(out).eval()
    # Each batch gets its own limit (`max_new_tokens`, as ours); the export's `max_length` would only
    # draw a warning per batch from `generate`.
    hf.generation_config.max_length = None
    hf_tokenizer = transformers.MarianTokenizer.from_pretrained(out)
    n = _SENTENCES.value
    sources, references = read("test_2016_flickr.en.gz", n), read("test_2016_flickr.de.gz", n)
    print(f"{_WORKDIR.value} step {step} ({_CHECKPOINT.value}), ours {cfg.dtype}, Marian float32 "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads); {len(sources)} sentences, "
          f"batch {_BATCH.value}")

    # Teacher-forced logits on the references, 64 sentences at a time.
    worst = 0.0
    for start in range(0, len(sources), 64):
        batch = hf_tokenizer(sources[start:start + 64], text_target=references[start:start + 64],
                             return_tensors="pt", padding=True)
        labels = batch["labels"].numpy()
        labels[labels < 0] = 0
        decoder_inputs = np.asarray(models.shift_right(jnp.asarray(labels)))
        with torch.no_grad():
            theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        decoder_input_ids=torch.tensor(decoder_inputs)).logits.numpy()
        ours = np.asarray(model.apply({"params": params}, jnp.asarray(batch["input_ids"].numpy()), jnp.asarray(labels)))
        worst = max(worst, float(np.abs(ours - theirs)[labels != 0].max()))
    print(f"logits: max |ours - Marian| = {worst:.2e} over all real target positions")

    rows = []
    for name, beam, kwargs in (("greedy", 1, dict(num_beams=1)),
                               (f"beam {_BEAM.value}", _BEAM.value,
                                dict(num_beams=_BEAM.value, length_penalty=_ALPHA.value, early_stopping="never"))):
        translator = evaluation.Translator(model, tokenizer, beam_size=beam, alpha=_ALPHA.value,
                                           length_penalty="power", batch_size=_BATCH.value)
        translator(params, sources)  # compile every length bucket first: compile time apart
        ours_times, theirs_times = [], []
        for _ in range(_ROUNDS.value):
            ours, seconds = timed(translator, params, sources)
            ours_times.append(seconds)
            theirs, seconds = timed(hf_translate, hf, hf_tokenizer, sources, _BATCH.value, **kwargs)
            theirs_times.append(seconds)
        same = np.mean([a == b for a, b in zip(ours, theirs)])
        rows.append((name, same, evaluation.bleu(ours, references, lowercase=True)[0],
                     evaluation.bleu(theirs, references, lowercase=True)[0],
                     len(sources) / statistics.median(ours_times), len(sources) / statistics.median(theirs_times)))
        print(f"{name}: sentences/s by round, ours {[round(len(sources) / t, 1) for t in ours_times]}, "
              f"Marian {[round(len(sources) / t, 1) for t in theirs_times]}", flush=True)
    print()
    print("| search | identical outputs | BLEU lc ours | BLEU lc Marian | ours sent/s | Marian generate sent/s "
          "| ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, same, b_ours, b_theirs, s_ours, s_theirs in rows:
        print(f"| {name} | {100 * same:.1f}% | {b_ours:.2f} | {b_theirs:.2f} | {s_ours:.1f} | {s_theirs:.1f} | "
              f"{s_ours / s_theirs:.2f}x |")


if __name__ == "__main__":
    cli.run(main)
