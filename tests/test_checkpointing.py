"""Checkpoints survive damage: a damaged step is never trusted, the run falls back to an intact one."""

import os
import shutil

import jax
import numpy as np
import pytest

from experiments.configs import copy as copy_config
from transformer import checkpointing, inference, sharding, training


def small_config(num_steps):
    config = copy_config.get_config()
    config.model.num_layers = 1
    config.data.batch_size = 16
    config.data.eval_batches = 1
    config.update(num_train_steps=num_steps, log_every=2, eval_every=1000)
    config.checkpoint.update(every=2, keep=3)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir with checkpoints at steps 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    training.train_and_evaluate(small_config(4), workdir)
    return workdir


@pytest.fixture
def workdir(trained, tmp_path):
    copy = str(tmp_path / "run")
    shutil.copytree(trained, copy)
    return copy


def step_dir(workdir, step):
    return os.path.join(workdir, "checkpoints", str(step), "state")


def flip_bytes(workdir, step, count=64):
    """Overwrites `count` bytes in the middle of the largest data file of a step."""
    files = [os.path.join(root, name) for root, _, names in os.walk(step_dir(workdir, step)) for name in names]
    target = max(files, key=os.path.getsize)
    with open(target, "r+b") as f:
        f.seek(os.path.getsize(target) // 2)
        f.write(bytes(range(256))[:count])


DAMAGES = {
    "metadata deleted": lambda w: os.remove(os.path.join(step_dir(w, 4), "_METADATA")),
    "state emptied": lambda w: [shutil.rmtree(step_dir(w, 4)), os.makedirs(step_dir(w, 4))],
    "bytes flipped": lambda w: flip_bytes(w, 4),
}


@pytest.mark.parametrize("damage", [pytest.param("metadata deleted", marks=pytest.mark.slow),
                                    pytest.param("state emptied", marks=pytest.mark.slow), "bytes flipped"])
def test_damaged_latest_falls_back_to_the_newest_intact_step(workdir, damage, caplog):
    DAMAGES[damage](workdir)
    final = training.train_and_evaluate(small_config(6), workdir)
    assert final["loss"] > 0 and np.isfinite(final["loss"])
    assert "Restored step 2, the newest intact checkpoint (damaged: steps [4])" in caplog.text
    config = small_config(6)
    trainer = training.Trainer(config, training.model_config(config), sharding.make_mesh())
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
    state, step = ckpt.restore_intact(trainer.abstract_state)
    ckpt.close()
    assert step == 6 and checkpointing.all_finite(state)


def test_non_finite_values_count_as_damage(workdir):
    config = small_config(4)
    trainer = training.Trainer(config, training.model_config(config), sharding.make_mesh())
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    state, _ = ckpt.restore_intact(trainer.abstract_state)
    poisoned = state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
    ckpt.save(6, poisoned, {"step": 6})
    with pytest.raises(checkpointing.CheckpointError, match="step 6 .* non-finite values"):
        ckpt.restore(trainer.abstract_state, 6)
    _, step = ckpt.restore_intact(trainer.abstract_state)
    ckpt.close()
    assert step == 4


def test_inference_names_the_damaged_step_and_the_others(workdir):
    DAMAGES["metadata deleted"](workdir)
    with pytest.raises(checkpointing.CheckpointError, match=r"step 4 .* damaged.*--step=N .* saved steps \[2\]"):
        inference.load_for_inference(workdir)
    _, _, _, _, step = inference.load_for_inference(workdir, step=2)
    assert step == 2


@pytest.mark.parametrize("problem", ["missing", pytest.param("truncated", marks=pytest.mark.slow)])
def test_a_missing_or_broken_data_state_is_an_error_unless_restart_data(workdir, problem):
    path = os.path.join(workdir, "checkpoints", "data_state", "4.process_0.json")
    if problem == "missing":
        os.remove(path)
    else:
        with open(path, "w") as f:
            f.write('{"ste')
    with pytest.raises(checkpointing.CheckpointError, match=rf"{path}.*--restart_data"):
        training.train_and_evaluate(small_config(6), workdir)
    training.train_and_evaluate(small_config(6), workdir, restart_data=True)
    config = small_config(6)
    trainer = training.Trainer(config, training.model_config(config), sharding.make_mesh())
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
    _, data_state, step = ckpt.restore(trainer.abstract_state)
    ckpt.close()
    assert step == 6 and data_state == {"step": 2}  # the data restarted at step 4: two batches since


def test_leftovers_of_killed_saves_are_removed(workdir):
    leftover = os.path.join(workdir, "checkpoints", "6.orbax-checkpoint-tmp-1234")
    os.makedirs(os.path.join(leftover, "state"))
    half_written = os.path.join(workdir, "checkpoints", "data_state", "6.process_0.json.tmp")
    open(half_written, "w").close()
    removed = checkpointing.remove_leftovers(os.path.join(workdir, "checkpoints"))
    assert sorted(removed) == sorted([leftover, half_written])
    assert not os.path.exists(leftover) and not os.path.exists(half_written)


def test_a_full_disk_is_reported_at_the_save_before_anything_is_written(workdir, monkeypatch):
    config = small_config(4)
    trainer = training.Trainer(config, training.model_config(config), sharding.make_mesh())
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    state, _ = ckpt.restore_intact(trainer.abstract_state)
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints", "data_state")))
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(checkpointing.CheckpointError, match=r"No room to save step 6: 0.0 MiB free .* step 4"):
        ckpt.save(6, state, {"step": 6})
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "data_state"))) == before
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()
