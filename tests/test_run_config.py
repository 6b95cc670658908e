"""The boundary from ConfigDict to TrainConfig: every leaf of every experiment config is read, or rejected."""

import importlib
import os
import subprocess
import sys

import ml_collections
import pytest

from transformer import tokens
from transformer.run_config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [("copy", None), ("copy", "reverse"), ("lm_synthetic", None), ("mlm_synthetic", None),
           ("multi30k", "paper"), ("multi30k", "full"), ("multi30k", "hour"), ("wmt14_ende_base", None),
           ("wmt14_ende_big", None), ("multi30k_char_lm", "plain"), ("multi30k_char_lm", "xl")]


def load(name, arg=None):
    module = importlib.import_module(f"experiments.configs.{name}")
    return module.get_config() if arg is None else module.get_config(arg)


def leaves(config, prefix=""):
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def parent_and_key(config, path):
    *parents, key = path.split(".")
    for name in parents:
        config = config[name]
    return config, key


def changed(value, field_type, current):
    """A different value of the same type (for an unset leaf: differing from `current`, what it resolves to)."""
    if isinstance(value, bool) or field_type is bool:
        return not (current if value is None else value)
    if isinstance(value, int) or field_type is int:
        base = current if value is None else value
        return 1 if base is None else base + 1  # e.g. num_kv_heads (None) -> 1, a divisor of any head count
    if isinstance(value, float) or field_type is float:
        base = current if value is None else value
        return (base or 0.0) * 0.5 + 0.0625
    if isinstance(value, str) or field_type is str:
        return (value or "") + "_changed"
    if isinstance(value, tuple):
        return tuple(value) + (1,)
    raise AssertionError(f"no perturbation for {value!r} ({field_type})")


@pytest.mark.parametrize("name, arg", CONFIGS)
def test_every_leaf_is_read_or_rejected(name, arg):
    """Changing any leaf changes the TrainConfig, or raises a ValueError naming a leaf.

    Either proves the leaf is read (the unchanged config converts cleanly). The error names the
    leaf itself, or one the change made inapplicable (e.g. data.name -> data.task).
    """
    baseline = TrainConfig.from_dict(load(name, arg))
    checked = 0
    for path, value in leaves(load(name, arg)):
        config = load(name, arg)
        parent, key = parent_and_key(config, path)
        current = None
        if path.startswith("model.") and key != "preset":
            current = getattr(baseline.model, "num_decoder_layers" if key == "num_layers" else key, None)
            if key == "num_layers" and baseline.objective == "mlm":
                current = baseline.model.num_encoder_layers
        new_value = changed(value, parent.get_type(key), current)
        with parent.ignore_type():
            parent[key] = new_value
        try:
            result = TrainConfig.from_dict(config)
        except ValueError as e:
            assert str(e).startswith("config.") and "=" in str(e).split()[0] or "config.model" in str(e), \
                f"{path}={new_value!r}: unclear error {e}"
        else:
            assert result != baseline, f"{path}={new_value!r} (was {value!r}) changed nothing"
        checked += 1
    assert checked == len(list(leaves(load(name, arg)))) > 40


def test_preset_means_its_preset_with_overrides_on_top():
    config = load("wmt14_ende_base")
    assert TrainConfig.from_dict(config).model.d_model == 512
    config.model.preset = "big"
    big = TrainConfig.from_dict(config).model
    assert (big.d_model, big.d_ff, big.num_heads, big.dropout_rate) == (1024, 4096, 16, 0.3)
    assert (big.max_len, big.dtype) == (256, "bfloat16")  # the config's own overrides stay
    config.model.d_ff = 1000
    assert TrainConfig.from_dict(config).model.d_ff == 1000


@pytest.mark.parametrize("name, arg, path, value, message", [
    ("copy", None, "data.tokens_per_batch", 4096, "applies only to real data"),
    ("copy", None, "data.tokenizer", "bpe",
     "applies only to real data. Leave it unset (on the command line: --config.data.tokenizer='')"),
    ("copy", None, "data.lowercase", True, "applies only to real data"),
    ("copy", None, "data.subword_samples", 64, "applies only to real data"),
    ("multi30k", "paper", "data.subword_samples", 64, "needs data.tokenizer='unigram'"),  # a BPE vocabulary
    ("multi30k", "hour", "data.subword_samples", 1, "must be 0 (always the best segmentation) or at least 2"),
    ("multi30k", "full", "data.subword_alpha", 0.1, "with data.subword_samples >= 2"),
    ("lm_synthetic", None, "data.task", "copy", "applies only to synthetic translation"),
    ("multi30k", "paper", "data.batch_size", 64, "sizes batches by data.tokens_per_batch"),
    ("multi30k", "hour", "data.tokens_per_batch", 4096, "applies only to data.batching='bucket'"),
    ("multi30k", "full", "optimizer.warmup_steps", 100, "not to 'cosine_cycles'"),
    ("copy", None, "optimizer.cycle_steps", (250, 250),
     "not to 'inverse_sqrt'. Leave it unset (on the command line: --config.optimizer.cycle_steps='()')"),
    ("copy", None, "decode.beam_size", 4, "applies only to translation on real data"),
    ("lm_synthetic", None, "model.num_encoder_layers", 3, "objectives with an encoder"),
    ("copy", None, "model.relative_num_buckets", 16, "model.position='relative'"),
    ("copy", None, "model.attention_chunk_size", 64, "model.attention='chunked'"),
    ("copy", None, "data.task", None, "must be set"),
    ("multi30k", "paper", "data.tokenizer", "wordpiece", "is not one of"),
    ("copy", None, "mesh.data", 0, "must be positive, or -1"),
    ("multi30k", "full", "fit_steps_to_budget", True, "a schedule that reads num_train_steps"),  # cosine_cycles
])
def test_a_leaf_that_cannot_apply_is_rejected_by_name(name, arg, path, value, message):
    config = load(name, arg)
    parent, key = parent_and_key(config, path)
    with parent.ignore_type():
        parent[key] = value
    with pytest.raises(ValueError, match=f"config.{path}") as error:
        TrainConfig.from_dict(config)
    assert message in str(error.value)


def test_subword_sampling_reaches_the_data_config():
    assert TrainConfig.from_dict(load("multi30k", "hour")).data.subword_samples == 64
    config = load("multi30k", "full")
    data = TrainConfig.from_dict(config).data
    assert (data.subword_samples, data.subword_alpha) == (0, None)
    config.data.subword_samples = 64
    with pytest.raises(ValueError, match="config.data.subword_alpha must be set"):
        TrainConfig.from_dict(config)
    config.data.subword_alpha = 0.1
    data = TrainConfig.from_dict(config).data
    assert (data.subword_samples, data.subword_alpha) == (64, 0.1)
    config.data.subword_alpha = 0.0
    with pytest.raises(ValueError, match=r"config.data.subword_alpha=0.0 must be positive"):
        TrainConfig.from_dict(config)


def test_hour_subword_sampling_turns_off_with_flag_values():
    # `hour` sets both fields; a flag cannot set a float to None, so 0 counts as unset and the error says so.
    config = load("multi30k", "hour")
    config.data.subword_samples = 0
    with pytest.raises(ValueError, match=r"config.data.subword_alpha=0.1 has no effect") as error:
        TrainConfig.from_dict(config)
    assert "--config.data.subword_alpha=0)" in str(error.value)
    config.data.subword_alpha = 0.0
    data = TrainConfig.from_dict(config).data
    assert (data.subword_samples, data.subword_alpha) == (0, None)


def test_fit_steps_to_budget_needs_a_warmup_to_measure_over_unless_there_is_no_budget():
    config = load("multi30k", "hour")  # fit_steps_to_budget, a 53-minute budget, a cosine
    config.optimizer.warmup_steps = 10
    with pytest.raises(ValueError, match="config.fit_steps_to_budget.*a warmup of at least 20 steps"):
        TrainConfig.from_dict(config)
    config.max_train_minutes = 0.0  # no budget: nothing to fit, the recipe's setting stands harmlessly
    assert TrainConfig.from_dict(config).fit_steps_to_budget


def test_model_vocab_size_is_the_data_s():
    config = load("copy")
    config.lock()  # as --config does
    with pytest.raises(AttributeError):
        config.model.vocab_size = 100  # not a field: lock_config rejects it on the command line
    assert TrainConfig.from_dict(config).model.vocab_size == config.data.vocab_size == 16
    mlm = TrainConfig.from_dict(load("mlm_synthetic"))
    assert mlm.model.vocab_size == tokens.mlm_vocab_size(32) == 33  # the text's 32 ids and [MASK]
    assert tokens.mask_id(32) == 32 and mlm.model_config(8000).vocab_size == 8001


def test_old_workdir_configs_load_with_inapplicable_leaves_dropped():
    config = load("multi30k", "hour").to_dict()
    config["model"]["vocab_size"] = 32000  # written by earlier versions, never read
    config["data"]["task"] = "copy"
    config = ml_collections.ConfigDict(config)
    with pytest.raises(ValueError, match="has no effect"):
        TrainConfig.from_dict(config)
    assert TrainConfig.from_dict(config, strict=False) == TrainConfig.from_dict(load("multi30k", "hour"))


def test_a_stored_config_from_before_ema_decay_loads_without_a_moving_average():
    config = load("multi30k", "hour").to_dict()
    del config["optimizer"]["ema_decay"]  # the config.json of runs older than the field
    assert TrainConfig.from_dict(ml_collections.ConfigDict(config)).optimizer.ema_decay == 0.0


def test_unknown_leaf_in_a_stored_config_is_an_error():
    config = load("copy").to_dict()
    config["optimizer"]["momentum"] = 0.9
    with pytest.raises(ValueError, match=r"config.optimizer has unknown field\(s\) \['momentum'\]"):
        TrainConfig.from_dict(ml_collections.ConfigDict(config))


@pytest.mark.slow  # a training subprocess (~15 s); the default suite stays under 10 minutes on 2 cores
def test_synthetic_training_loads_neither_tfds_nor_sentencepiece(tmp_path):
    """`import transformer.training` and a synthetic run import no TFDS / SentencePiece, and honour prng_impl."""
    script = f"""
import sys, jax
from experiments.configs import copy
from transformer import checkpointing, training
config = copy.get_config()
config.model.num_layers = 1
config.update(num_train_steps=1, log_every=1, eval_every=1, prng_impl="unsafe_rbg")
config.data.eval_batches = 1
training.train_and_evaluate(config, {str(tmp_path)!r})
trainer = training.Trainer(config, training.model_config(config), training.sharding.make_mesh())
state, _, _ = checkpointing.Checkpointer({str(tmp_path / 'checkpoints')!r}).restore(trainer.abstract_state)
print("rng", state.rng.shape, jax.config.jax_default_prng_impl)
print("loaded", sorted(m for m in ("tensorflow_datasets", "sentencepiece", "tensorflow") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded []" in result.stdout, result.stdout
    assert "rng (4,) unsafe_rbg" in result.stdout  # an unsafe_rbg key is uint32[4]; threefry's is uint32[2]
