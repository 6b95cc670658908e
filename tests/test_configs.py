"""Every experiment config builds its data pipeline, model and step and trains two steps.

Configs on real data run on Multi30k as a stand-in (WMT cannot be downloaded here), shrunk to one
layer and a small vocabulary; everything else is the config's own, but for where the big model's
state lives: its default data-parallel mesh holds a whole copy of the parameters and Adam moments on
each of the eight simulated devices (a 10 GiB process for a one-layer model), so its test shards
them over the devices instead (FSDP, ~3.4 GiB). A CI worker died in this test twice: first with the
replicated state, then (stop 51) with FSDP, from a fatal signal (Python's fault handler printed the
threads; the log kept only its tail). One candidate: XLA:CPU aborts a process whose simulated devices
wait over 40 s for one another at a collective (conftest.py raises that limit). This test now trains
the big model in a subprocess, so a death there fails it with the signal and XLA's last fatal line.
"""

import importlib
import json
import os
import subprocess
import sys

import pytest

from transformer import optimizers, training
from transformer.run_config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CONFIGS = [("copy", None), ("copy", "reverse"), ("lm_synthetic", None), ("mlm_synthetic", None),
           ("multi30k", "paper"), ("multi30k", "full"), ("multi30k", "hour"), ("multi30k", "two_hours"), ("wmt14_ende_base", None), ("wmt14_ende_big", None),
           ("multi30k_char_lm", "plain"), ("multi30k_char_lm", "xl")]


def load(name, arg):
    module = importlib.import_module(f"experiments.configs.{name}")
    return module.get_config() if arg is None else module.get_config(arg)


def test_paper_hyperparameters():
    base, big = (TrainConfig.from_dict(load(name, None)) for name in ("wmt14_ende_base", "wmt14_ende_big"))
    assert (base.model.d_model, base.model.dropout_rate, base.num_train_steps, base.checkpoint.keep) == (
        512, 0.1, 100_000, 5)
    assert (big.model.d_model, big.model.d_ff, big.model.num_heads, big.model.dropout_rate,
            big.num_train_steps, big.checkpoint.keep) == (1024, 4096, 16, 0.3, 300_000, 20)
    for config in (base, big):
        assert config.data.name == "wmt14_translate/de-en" and config.data.vocab_size == 37_000
        assert config.data.tokenizer == "bpe"  # one shared BPE vocabulary (paper, Sec. 5.1)
        assert config.data.tokens_per_batch == 25_000 and config.optimizer.warmup_steps == 4000
        assert (config.optimizer.b1, config.optimizer.b2, config.optimizer.eps) == (0.9, 0.98, 1e-9)
        assert (config.decode.beam_size, config.decode.alpha, config.label_smoothing) == (4, 0.6, 0.1)


def test_multi30k_paper_recipe():
    """`multi30k.py:paper` has the published Transformer-Tiny recipe's hyperparameters (Wu et al., 2021), BPE included."""
    c = TrainConfig.from_dict(load("multi30k", "paper"))
    m = c.model
    assert (m.num_encoder_layers, m.num_decoder_layers, m.d_model, m.d_ff, m.num_heads, m.dropout_rate) == (
        4, 4, 128, 256, 4, 0.3)
    assert m.share_embeddings and c.data.vocab_size == 10_000 and c.data.tokens_per_batch == 8192
    assert c.data.tokenizer == "bpe" and c.data.batching == "bucket"
    assert (c.optimizer.schedule, c.optimizer.learning_rate, c.optimizer.warmup_steps) == ("inverse_sqrt", 5e-3, 2000)
    assert (c.num_train_steps, c.checkpoint.keep, c.decode.beam_size, c.label_smoothing) == (8000, 10, 5, 0.1)


def test_multi30k_variants_share_the_model_and_reject_unknown_names():
    models = {v: TrainConfig.from_dict(load("multi30k", v)).model for v in ("paper", "full", "hour", "two_hours")}
    shape = lambda m: (m.num_encoder_layers, m.d_model, m.d_ff, m.num_heads)  # noqa: E731
    assert shape(models["full"]) == shape(models["hour"]) == shape(models["two_hours"]) == shape(models["paper"])
    with pytest.raises(ValueError, match="Unknown multi30k variant 'fast'"):
        load("multi30k", "fast")


def test_multi30k_full_recipe_is_two_cosine_cycles():
    """`full`: two 7,000-update cosine cycles; each anneals to zero, the second peaks at half the first."""
    full = load("multi30k", "full")
    run = TrainConfig.from_dict(full)
    schedule = optimizers.make_schedule(run.optimizer, d_model=run.model.d_model, total_steps=run.num_train_steps)
    lr = full.optimizer.learning_rate
    assert full.num_train_steps == 14_000
    assert float(schedule(800)) == pytest.approx(lr) and float(schedule(7000 + 500)) == pytest.approx(lr / 2)
    for end in (7000, 14_000):
        assert float(schedule(end)) == pytest.approx(0.0, abs=1e-9)
    full.num_train_steps = 10_000
    with pytest.raises(ValueError, match="config.optimizer.cycle_steps=.* sum to 14000, not to num_train_steps=10000"):
        TrainConfig.from_dict(full)


def train_two_steps(name, arg, multi30k_dir: str, tmp: str) -> dict:
    """Trains `name`'s config (shrunk as the module docstring says) for two steps in `tmp`."""
    config = load(name, arg)
    config.model.num_layers = 1
    config.num_train_steps = 2
    if config.optimizer.warmup_steps is not None:
        config.optimizer.warmup_steps = 1  # a cosine schedule needs warmup < num_train_steps
    if config.optimizer.schedule == "cosine_cycles":  # one update per cycle
        config.optimizer.cycle_steps = (1, 1)
        config.optimizer.cycle_warmup_steps = (0, 0)
    if config.model.preset == "big":
        config.mesh.data, config.mesh.fsdp = 1, -1
    config.log_every = config.eval_every = config.checkpoint.every = 2
    config.bleu_every = 0
    config.max_train_minutes = 0.0
    if config.data.name != "synthetic":
        config.data.name = "multi30k"  # the stand-in
        config.data.manual_dir = multi30k_dir
        config.data.data_dir = os.path.join(tmp, "tfds")
        config.data.vocab_size = 500
        if config.data.batching == "bucket":
            config.data.tokens_per_batch = min(config.data.tokens_per_batch, 2048)
        else:
            config.data.batch_size = min(config.data.batch_size, 32)
        config.data.eval_batch_size = min(config.data.eval_batch_size, 32)
        config.prng_impl = ""
    return training.train_and_evaluate(config, os.path.join(tmp, "run"))


def train_two_steps_in_a_subprocess(name, arg, multi30k_dir: str, tmp: str) -> dict:
    """`train_two_steps` in a fresh Python process. If that process dies, the test fails with how it
    died (signal, XLA's fatal log line) instead of taking its xdist worker down with it."""
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_configs; "
            f"print(json.dumps(test_configs.train_two_steps({name!r}, {arg!r}, {multi30k_dir!r}, {tmp!r}), default=float))")
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        fatal = [line for line in proc.stderr.splitlines()
                 if line.startswith(("F", "Fatal Python error", "Traceback")) or "Error" in line]
        raise AssertionError(f"the {name} two-step run exited with {proc.returncode}: {' | '.join(fatal[-5:])[:2000]}"
                             f"\n--- stderr tail ---\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name, arg", CONFIGS)
def test_config_trains_two_steps(tmp_path, multi30k_dir, name, arg):
    # The big model trains in its own process (module docstring: a CI worker died in this test twice).
    run = train_two_steps_in_a_subprocess if name == "wmt14_ende_big" else train_two_steps
    final = run(name, arg, multi30k_dir, str(tmp_path))
    assert final["loss"] > 0 and final["eval_loss"] > 0
