"""Choosing the length penalty on val: one beam search per alpha against one search for all of them.

    python -m experiments.benchmarks.alpha_search --workdir=runs/multi30k_hour
    python -m experiments.benchmarks.alpha_search --workdir=runs/multi30k_hour --alphas=0.6,1.0 --rounds=5

`reproduce_multi30k` decodes val with each of its length penalties and keeps the best. Alpha only
ranks finished hypotheses, so `Translator.with_alphas` (one `decoding.beam_search` keeping a
finished set per alpha) gives the same translations as one search per alpha. This times both on a
trained run's split, alternating them over `--rounds` after a compiling pass of each, checks that
their translations are identical, and prints the medians, their ratio and each alpha's BLEU.
Parameters are the run's ("averaged" checkpoint if there is one, else "latest").
"""

import statistics
import time

import jax
from absl import flags

from experiments import cli
from experiments.benchmarks import trained_run
from transformer import evaluation

_WORKDIR = flags.DEFINE_string("workdir", None, "A translation run's workdir.", required=True)
_SPLIT = flags.DEFINE_string("split", "validation", "Which split to translate.")
_ALPHAS = flags.DEFINE_list("alphas", ["0.8", "1.0", "1.2", "1.5"], "Length penalties (reproduce_multi30k's).")
_BEAM = flags.DEFINE_integer("beam_size", None, "Beam size (default: the run's decode.beam_size).", lower_bound=2)
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating timed rounds (each: one search per alpha, then one for all).",
                               lower_bound=1)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(argv):
    del argv
    alphas = cli.parse_alphas(_ALPHAS.value)
    if alphas == [None]:
        raise cli.UserError("--alphas: give one or more length penalties.")
    run, trainer, params, tokenizer, sources, references, where = trained_run.load_translation_run(
        _WORKDIR.value, _SPLIT.value)
    translator = evaluation.Translator.from_config(trainer.model, tokenizer, run.decode,
                                                   max_input_length=run.data.max_length,
                                                   sharding=trainer.batch_sharding, beam_size=_BEAM.value)
    print(f"{time.strftime('%Y-%m-%d')}: {where}, beam {translator.beam_size}, batches of {translator.batch_size}, "
          f"alphas {', '.join(f'{a:g}' for a in alphas)}; JAX {jax.__version__} on {jax.devices()[0].device_kind}")

    def each():  # one search per alpha, as before
        return {alpha: translator(params, sources, alpha) for alpha in alphas}

    def joint():  # one search for all of them
        return translator.with_alphas(params, sources, alphas)

    with trainer.context():
        _, each_first = timed(each)
        _, joint_first = timed(joint)
        print(f"first passes (compile included): one search per alpha {each_first:.1f} s, one for all "
              f"{joint_first:.1f} s", flush=True)
        print("| round | one search per alpha, s | one search for all, s | ratio | identical |")
        print("| --- | --- | --- | --- | --- |")
        times = {"each": [], "joint": []}
        identical = True
        for r in range(_ROUNDS.value):
            per_alpha, seconds = timed(each)
            times["each"].append(seconds)
            together, seconds = timed(joint)
            times["joint"].append(seconds)
            same = all(per_alpha[a] == together[a] for a in alphas)
            identical &= same
            print(f"| {r} | {times['each'][-1]:.1f} | {times['joint'][-1]:.1f} | "
                  f"{times['each'][-1] / times['joint'][-1]:.2f}x | {'yes' if same else 'NO'} |", flush=True)
    each_s, joint_s = statistics.median(times["each"]), statistics.median(times["joint"])
    print(f"medians: one search per alpha {each_s:.1f} s, one for all {joint_s:.1f} s: **{each_s / joint_s:.2f}x**; "
          f"translations {'identical' if identical else 'DIFFERENT'} in every round")
    for alpha in alphas:
        print(f"alpha {alpha:g}: BLEU lc {evaluation.bleu(together[alpha], references, lowercase=True)[0]:.2f}, "
              f"cased {evaluation.bleu(together[alpha], references)[0]:.2f}")
    if not identical:
        raise SystemExit("The two ways translated differently.")


if __name__ == "__main__":
    cli.run(main)
