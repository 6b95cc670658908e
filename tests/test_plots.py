"""Training curves from metrics.jsonl (transformer.plots, experiments.plot): missing metrics, time axis, the command."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from transformer import plots

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_metrics(workdir, records, tail=""):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + tail)
    return str(workdir)


def translation_run(workdir):
    """Every metric the trainer writes for a translation run with BLEU during training."""
    records = []
    for step in range(10, 110, 10):
        records.append({"step": step, "train/loss": 5.0 / step ** 0.5, "train/learning_rate": 1e-3 * step / 100,
                        "train/step_time": 0.6, "train/tokens_per_s": 5000.0 + step})
        if step % 50 == 0:
            records.append({"step": step, "eval/loss": 2.0 - step / 100, "eval/bleu": step / 4,
                            "eval/bleu_lc": step / 4 + 1})
    return write_metrics(workdir, records)


def lm_run(workdir):
    """Fewer metrics (no BLEU, no step times), and a last line cut short by a crash."""
    records = [{"step": s, "train/loss": 4.0 - s / 50} for s in (20, 40, 60)] + [{"step": 60, "eval/loss": 3.0}]
    return write_metrics(workdir, records, tail='{"step": 80, "train/lo')


def read_png(path):
    import matplotlib.image  # noqa: PLC0415

    assert os.path.getsize(path) > 10_000, path
    return matplotlib.image.imread(path)


def test_two_runs_on_one_figure_with_the_metrics_either_has(tmp_path):
    runs = [translation_run(tmp_path / "base"), lm_run(tmp_path / "other" / "lm")]
    path = plots.plot_training(runs, str(tmp_path / "out" / "curves.png"))
    both = read_png(path)
    assert both[..., :3].std() > 0.05
    # A row of panels per metric that any run wrote: 5 here, 2 for the LM alone (no BLEU, rate, speed).
    lm_only = read_png(plots.plot_training(runs[1:], str(tmp_path / "lm.png")))
    row_height = (both.shape[0] - lm_only.shape[0]) / 3
    assert both.shape[0] == pytest.approx(lm_only.shape[0] + 3 * row_height) and row_height == 240
    assert both.shape[1] == lm_only.shape[1] == 1000


def test_records_and_the_training_time_axis(tmp_path):
    records = plots.read_metrics(lm_run(tmp_path / "lm"))
    assert [r["step"] for r in records] == [20, 40, 60, 60]  # the cut line is skipped
    steps, values = plots.series(records, "eval/loss")
    assert steps.tolist() == [60] and values.tolist() == [3.0]
    assert plots.training_minutes(records, steps) is None  # no step times logged

    timed = [{"step": 10, "train/step_time": 0.6}, {"step": 30, "train/step_time": 1.5}]
    minutes = plots.training_minutes(timed, np.array([10.0, 20.0, 30.0]))
    np.testing.assert_allclose(minutes, np.array([6.0, 21.0, 36.0]) / 60)  # 10 * 0.6 s, then 20 * 1.5 s
    # With timestamps: wall-clock time, the pause between steps 10 and 30 (an evaluation) included;
    # the run started the first window's step time (10 * 0.6 s) before its first record.
    stamped = [{**timed[0], "wall_time": 1000.0}, {"step": 10, "eval/loss": 2.0, "wall_time": 1090.0},
               {**timed[1], "wall_time": 1120.0}]
    minutes = plots.training_minutes(stamped, np.array([0.0, 10.0, 20.0, 30.0]))
    np.testing.assert_allclose(minutes, np.array([0.0, 6.0, 66.0, 126.0]) / 60)
    with pytest.raises(FileNotFoundError, match="the workdir of a training run"):
        plots.read_metrics(str(tmp_path / "nowhere"))
    assert plots.run_labels(["a/run", "b/run", "c/other/"]) == ["a/run", "b/run", "other"]


def test_plot_command(tmp_path):
    runs = [translation_run(tmp_path / "base"), lm_run(tmp_path / "lm")]
    command = [sys.executable, "-m", "experiments.plot", f"--workdir={runs[0]}", f"--workdir={runs[1]}",
               f"--out={tmp_path / 'plots'}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(tmp_path / "plots" / "training.png")
    read_png(result.stdout.strip())
    empty = write_metrics(tmp_path / "empty", [{"step": 1, "train/grad_norm": 1.0}])
    result = subprocess.run([sys.executable, "-m", "experiments.plot", f"--workdir={empty}"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "No metric to plot" in result.stderr


@pytest.mark.slow
def test_reproduce_multi30k_writes_results_and_its_plot(tmp_path, multi30k_dir):
    """The recipe's entry point end to end, shrunk to 4 updates of a 1-layer model: training, averaging,
    BLEU on val and test (the weights, averaged checkpoints or moving average, and the alpha chosen on
    val), results.json, and the training curves it draws at the end."""
    workdir = tmp_path / "run"
    overrides = dict(num_train_steps=4, max_train_minutes=0, log_every=2, eval_every=4, bleu_every=0, prng_impl="",
                     **{"optimizer.warmup_steps": 1, "checkpoint.every": 2, "model.num_layers": 1,
                        "model.d_model": 32, "model.d_ff": 64, "model.num_heads": 2, "data.vocab_size": 300,
                        "data.batch_size": 32, "data.eval_batch_size": 64, "decode.beam_size": 2,
                        "decode.batch_size": 250, "optimizer.ema_decay": 0.5})
    command = [sys.executable, "-m", "experiments.reproduce_multi30k", f"--workdir={workdir}",
               "--config=experiments/configs/multi30k.py:hour", f"--raw_dir={multi30k_dir}", "--num_average=2",
               "--alphas=0.6,1.5",
               *(f"--config.{k}={v}" for k, v in overrides.items())]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(workdir / "results.json") as f:
        results = json.load(f)
    assert results["steps"] == 4 and results["averaged"] == [2, 4]
    assert set(results["splits"]) == {"validation", "test"}
    # The weights were chosen on val: each candidate's best alpha, the better of the two taken.
    candidates = results["weights_search"]
    assert set(candidates) == {"averaged", "ema"} and results["weights"] in candidates
    assert candidates[results["weights"]]["bleu_lc"] == max(c["bleu_lc"] for c in candidates.values())
    assert candidates["averaged"]["perplexity"] != candidates["ema"]["perplexity"]  # different parameters
    assert results["splits"]["validation"]["bleu_lc"] == candidates[results["weights"]]["bleu_lc"]
    assert f"Weights chosen on val: {results['weights']}" in result.stdout
    # The length penalty was chosen on val, from one beam search serving both alphas.
    assert set(results["alpha_search"]) == {"0.6", "1.5"}
    best = results["splits"]["validation"]["alpha"]
    assert results["splits"]["test"]["alpha"] == best
    searched = results["alpha_search"]
    assert searched[f"{best:g}"]["bleu_lc"] == max(s["bleu_lc"] for s in searched.values())
    for scores in (*searched.values(), *results["splits"].values()):
        assert scores["length_ratio"] > 0  # hypothesis / reference tokens (the brevity penalty's)
    assert "length ratio" in result.stdout
    for alpha in ("0.6", "1.5"):
        for weights in ("averaged", "ema"):
            assert (workdir / "eval" / f"validation.{weights}.alpha{alpha}.txt").exists()
    assert (workdir / "eval" / f"test.{results['weights']}.json").exists()
    assert f"Training curves: {workdir / 'plots' / 'training.png'}" in result.stdout
    image = read_png(str(workdir / "plots" / "training.png"))
    assert image.shape[1] == 1000 and image.shape[0] > 600  # both columns, several metric rows
