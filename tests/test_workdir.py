"""One trainer per workdir; a workdir only ever continues the run it holds; metrics stay in order."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from experiments.configs import copy as copy_config
from transformer import inference, training, workdir


def small_config(num_steps):
    config = copy_config.get_config()
    config.model.num_layers = 1
    config.data.batch_size = 16
    config.data.eval_batches = 1
    config.update(num_train_steps=num_steps, log_every=1, eval_every=1000)
    config.checkpoint.update(every=2, keep=3)
    return config


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_trainer_fails_at_once_naming_the_holder(tmp_path):
    with workdir.lock(str(tmp_path)):
        holder = json.loads((tmp_path / "LOCK").read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(workdir.WorkdirError, match=rf"in use by pid {os.getpid()} on host .*delete .*LOCK"):
            training.train_and_evaluate(small_config(2), str(tmp_path))
    assert not (tmp_path / "LOCK").exists()  # released
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "checkpoints").exists()


def test_the_lock_of_a_killed_trainer_is_taken_over(tmp_path, caplog):
    (tmp_path / "LOCK").write_text(json.dumps(dict(pid=dead_pid(), host=os.uname().nodename, started="then")))
    with workdir.lock(str(tmp_path)):
        assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()
    assert "Taking over the lock" in caplog.text
    (tmp_path / "LOCK").write_text("")  # killed between creating and writing it
    with workdir.lock(str(tmp_path)):
        pass


def test_a_changed_model_is_refused_before_anything_is_overwritten(tmp_path):
    run = str(tmp_path / "run")
    training.train_and_evaluate(small_config(2), run)
    before = {name: (tmp_path / "run" / name).read_bytes() for name in ("config.json", "metrics.jsonl")}
    config = small_config(4)
    config.model.num_layers = 2
    with pytest.raises(workdir.WorkdirError, match="another model or optimizer .* differences"):
        training.train_and_evaluate(config, run)
    assert before == {name: (tmp_path / "run" / name).read_bytes() for name in before}
    _, _, _, _, step = inference.load_for_inference(run)  # the intact checkpoints still load
    assert step == 2


@pytest.mark.slow  # end to end (~20-35 s); the default suite stays under 10 minutes on 2 cores
def test_metrics_stay_monotonic_across_a_crash_and_resume(tmp_path):
    run = str(tmp_path / "run")
    training.train_and_evaluate(small_config(4), run)
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:  # logged after the last checkpoint, then a crash
        f.write(json.dumps({"step": 5, "train/loss": 1.0}) + "\n" + '{"step": 6, "tr')
    shutil.rmtree(os.path.join(run, "checkpoints", "4"))  # ... before step 4's checkpoint committed
    training.train_and_evaluate(small_config(6), run)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if "train/loss" in line]
    assert steps == [1, 2, 3, 4, 5, 6]
