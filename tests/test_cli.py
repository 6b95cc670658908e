"""Every entry point answers a user's mistake with one line on stderr and exit code 1, never a traceback."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPY = "--config=experiments/configs/copy.py"


def run(module, *flags, stdin=None):
    return subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO, capture_output=True, text=True,
                          input=stdin, timeout=300)


def slow(*values):
    """A case that runs with `-m slow`; the default suite keeps one case of each kind."""
    return pytest.param(*values, marks=pytest.mark.slow)


CASES = [
    # unknown or ill-typed config fields
    ("experiments.train", [COPY, "--workdir={tmp}/w", "--config.model.d_modle=3"], 'Did you mean "d_model"'),
    slow("experiments.train", [COPY, "--workdir={tmp}/w", "--config.log_every=abc"], "--config.log_every=abc"),
    slow("experiments.train", [COPY, "--workdir={tmp}/w", "--config.data.tokens_per_batch=100"], "has no effect"),
    slow("experiments.reproduce_multi30k", ["--workdir={tmp}/w", "--config.data.task=copy"], "config.data.task"),
    slow("experiments.reproduce_multi30k", ["--workdir={tmp}/w", "--alphas=0.6,x"], "--alphas=0.6,x"),
    slow("experiments.reproduce_multi30k", ["--workdir={tmp}/w", "--alphas=-1"], "must be >= 0"),
    slow("experiments.benchmarks.train_step", ["--presets=huge"], "Unknown ModelConfig preset 'huge'"),
    # zero intervals and invalid numbers
    ("experiments.train", [COPY, "--workdir={tmp}/w", "--config.log_every=0"], "config.log_every=0 must be positive"),
    slow("experiments.train", [COPY, "--workdir={tmp}/w", "--config.checkpoint.every=0"], "checkpoint.every=0"),
    slow("experiments.train", [COPY, "--workdir={tmp}/w", "--config.data.batch_size=0"], "data.batch_size=0"),
    slow("experiments.train", [COPY, "--workdir={tmp}/w", "--config.num_train_steps=-5"], "num_train_steps=-5"),
    ("experiments.translate", ["--workdir={tmp}/w", "--beam_size=0"], "--beam_size=0"),
    slow("experiments.translate", ["--workdir={tmp}/w", "--beam_size=100000"], "--beam_size=100000"),
    slow("experiments.translate", ["--workdir={tmp}/w", "--batch_size=-1"], "--batch_size=-1"),
    slow("experiments.evaluate", ["--workdir={tmp}/w", "--alpha=-5"], "--alpha=-5"),
    slow("experiments.average", ["--workdir={tmp}/w", "--num_checkpoints=0"], "--num_checkpoints=0"),
    slow("experiments.average", ["--workdir={tmp}/w", "--num_checkpoints=-2"], "--num_checkpoints=-2"),
    slow("experiments.sample", ["--workdir={tmp}/w", "--top_k=-1"], "--top_k=-1"),
    # missing config or data files, nonexistent workdirs
    ("experiments.train", ["--config=experiments/configs/nope.py", "--workdir={tmp}/w"], "nope.py"),
    slow("experiments.train", [COPY], "--workdir"),
    slow("experiments.reproduce_multi30k", ["--workdir={tmp}/w", "--raw_dir={tmp}/no_data",
                                        "--config.data.vocab_size=100"], "no_data"),
    ("experiments.evaluate", ["--workdir={tmp}/nowhere"], "is {tmp}/nowhere the workdir of a training run?"),
    slow("experiments.translate", ["--workdir={tmp}/nowhere"], "is {tmp}/nowhere the workdir of a training run?"),
    slow("experiments.sample", ["--workdir={tmp}/nowhere"], "is {tmp}/nowhere the workdir of a training run?"),
    slow("experiments.average", ["--workdir={tmp}/nowhere"], "is {tmp}/nowhere the workdir of a training run?"),
    ("experiments.evaluate", ["--workdir={tmp}/w", "stray"], "unexpected arguments ['stray']"),
]


def case_id(index, case):
    module = (case.values if hasattr(case, "values") else case)[0]
    return f"{module.split('.')[-1]}-{index}"


@pytest.mark.parametrize("module, flags, message", CASES, ids=[case_id(i, c) for i, c in enumerate(CASES)])
def test_a_mistake_is_one_clear_line(tmp_path, module, flags, message):
    result = run(module, *[f.format(tmp=tmp_path) for f in flags])
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert message.format(tmp=tmp_path) in result.stderr, result.stderr[-2000:]


@pytest.fixture(scope="module")
def synthetic_runs(tmp_path_factory):
    """Two-step runs of the copy task (translation) and of the synthetic language model."""
    from experiments.configs import copy as copy_config
    from experiments.configs import lm_synthetic
    from transformer import training

    runs = {}
    for name, module in (("copy", copy_config), ("lm", lm_synthetic)):
        config = module.get_config()
        config.model.num_layers = 1
        config.update(num_train_steps=2, log_every=2, eval_every=2)
        config.checkpoint.every = 2
        runs[name] = str(tmp_path_factory.mktemp(name) / "run")
        training.train_and_evaluate(config, runs[name])
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("run_name, module, flags, message", [
    ("copy", "experiments.evaluate", [], "scoring needs a translation run on real data"),
    ("copy", "experiments.translate", [], "translating needs a translation run trained on real text"),
    ("copy", "experiments.sample", [], "sampling needs an 'lm' run"),
    ("lm", "experiments.sample", ["--prompt=A man"], "give token ids separated by spaces"),
    ("lm", "experiments.sample", ["--prompt=3 999"], "ids [999] are outside the vocabulary"),
    ("lm", "experiments.sample", ["--top_k=100000"], "--top_k=100000 exceeds the vocabulary"),
    ("lm", "experiments.sample", ["--step=7"], "No checkpoint at step 7"),
    ("lm", "experiments.train", [COPY], "another model or optimizer"),
])
def test_a_workdir_of_the_wrong_kind_is_one_clear_line(synthetic_runs, run_name, module, flags, message):
    result = run(module, f"--workdir={synthetic_runs[run_name]}", *flags)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and message in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_sampling_with_an_empty_prompt_works(synthetic_runs):
    result = run("experiments.sample", f"--workdir={synthetic_runs['lm']}", "--prompt=", "--prompt=3 4",
                 "--max_length=8")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[1].startswith("3 4")
