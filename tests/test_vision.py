"""The ViT (transformer/vision.py), its image data (transformer/data/images.py) and its trainer
(transformer/vision_training.py, experiments/configs/vit_*.py)."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import vit_cifar10, vit_digits
from transformer import vision_training
from transformer.config import ModelConfig
from transformer.data import images
from transformer.run_config import ConfigError
from transformer.vision import PatchEmbedding, ViT, VisionConfig

TINY = ModelConfig.preset("tiny", vocab_size=10, d_model=16, d_ff=32, num_heads=2, num_encoder_layers=1,
                          position="learned", max_len=17, norm_position="pre", activation="gelu", dropout_rate=0.0,
                          attention="reference")


def numpy_patch_embedding(images_np, kernel, bias, p):
    """Independent reference: cut each image into P x P patches row by row, flatten (row, col, channel), project."""
    out = []
    for image in images_np:
        rows = []
        for r in range(image.shape[0] // p):
            for c in range(image.shape[1] // p):
                rows.append(image[r * p:(r + 1) * p, c * p:(c + 1) * p, :].reshape(-1))
        out.append(np.stack(rows) @ kernel + bias)
    return np.stack(out)


def test_patch_embedding_equals_numpy_patchify_and_matmul():
    x = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)  # not square: rows vs columns
    module = PatchEmbedding(d_model=5, patch_size=4)
    params = nn.meta.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), x)["params"])
    params["bias"] = jnp.linspace(-1.0, 1.0, 5)  # a non-zero bias too
    got = module.apply({"params": params}, x)
    assert got.shape == (2, 6, 5)  # (8/4) * (12/4) patches
    want = numpy_patch_embedding(x, np.asarray(params["kernel"]), np.asarray(params["bias"]), 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def init_vit(vision, model_cfg=TINY, batch=3):
    model = ViT(model_cfg, vision)
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, vision.image_size, vision.image_size, vision.channels))
    return model, nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), x)["params"]), x


def swap_patches(x, p):
    """Images with their first and last P x P patches exchanged: the same set of patches, in another order."""
    x = np.array(x)
    first, last = x[:, :p, :p].copy(), x[:, -p:, -p:].copy()
    x[:, :p, :p], x[:, -p:, -p:] = last, first
    return x


@pytest.mark.parametrize("pooling, has_token", [("cls", True), ("mean", False)])
def test_shapes_and_position_embeddings_make_the_model_sensitive_to_patch_order(pooling, has_token):
    vision = VisionConfig(image_size=8, channels=1, patch_size=2, pooling=pooling, num_classes=7)
    model, params, x = init_vit(vision)
    assert vision.sequence_length == 16 + has_token
    assert ("cls_token" in params) == has_token
    if has_token:
        assert params["cls_token"].shape == (1, 1, 16)
    assert params["encoder"]["position_embedding"]["embedding"].shape == (17, 16)  # TINY.max_len x d_model
    assert params["head_kernel"].shape == (16, 7)
    apply = jax.jit(model.apply)
    logits = apply({"params": params}, x)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    with pytest.raises(ValueError, match=r"expects images \[B, 8, 8, 1\]"):
        model.apply({"params": params}, x[:, :4])
    # The head starts at zero (all logits 0 whatever the input): give it weights so logits depend on the input.
    params["head_kernel"] = jax.random.normal(jax.random.PRNGKey(2), params["head_kernel"].shape)
    swapped = swap_patches(x, 2)
    assert float(jnp.max(jnp.abs(apply({"params": params}, x) - apply({"params": params}, swapped)))) > 1e-3
    # Without position information the encoder is permutation-equivariant and both poolings invariant.
    table = params["encoder"]["position_embedding"]["embedding"]
    params["encoder"]["position_embedding"]["embedding"] = jnp.zeros_like(table)
    np.testing.assert_allclose(apply({"params": params}, x), apply({"params": params}, swapped), rtol=1e-5, atol=1e-5)


def test_vision_config_validation():
    with pytest.raises(ValueError, match="image_size=8 is not divisible by patch_size=3"):
        VisionConfig(image_size=8, patch_size=3)
    with pytest.raises(ValueError, match=r"pooling='max' is not one of \['cls', 'mean'\]"):
        VisionConfig(pooling="max")
    with pytest.raises(ValueError, match="channels=0 must be a positive integer"):
        VisionConfig(channels=0)
    with pytest.raises(ValueError, match="max_len=16 is shorter than the 17 positions .* set max_len >= 17"):
        VisionConfig(image_size=8, patch_size=2, pooling="cls").check_model(TINY.replace(max_len=16))
    VisionConfig(image_size=8, patch_size=2, pooling="mean").check_model(TINY.replace(max_len=16))  # 16 patches fit


@pytest.mark.parametrize("field, value, message", [
    ("image.patch_size", 3, "config.image: VisionConfig.image_size=8 is not divisible by patch_size=3"),
    ("model.max_len", 8, "config.model: .*max_len=8 is shorter than the 16 positions"),
    ("model.num_decoder_layers", 2, "config.model.num_decoder_layers=2 has no effect"),
    ("model.tie_output", False, None),  # False is "unset" for a bool: no error
    ("data.data_dir", "/tmp/tfds", "config.data.data_dir='/tmp/tfds' has no effect"),
    ("data.name", "mnist", r"config.data.name='mnist' is not one of \['digits', 'cifar10'\]"),
    ("data.max_shift", -1, "config.data.max_shift=-1 must be >= 0"),
    ("optimizer.grad_accum_steps", 2, "config.optimizer.grad_accum_steps=2 must be 1"),
])
def test_config_errors_name_the_field(field, value, message):
    config = vit_digits.get_config()
    section, name = field.split(".")
    config[section][name] = value
    if message is None:
        vision_training.VisionTrainConfig.from_dict(config)
        return
    with pytest.raises(ConfigError, match=message):
        vision_training.VisionTrainConfig.from_dict(config)


def test_data_that_does_not_match_config_image_is_refused():
    run = vision_training.VisionTrainConfig.from_dict(vit_cifar10.get_config())
    with pytest.raises(ConfigError, match=r"\(32, 32, 3\) images in 10 classes, but the data has \(8, 8, 1\)"):
        vision_training.check_data(run.image, images.load_digits())


def test_digits_split_is_fixed_stratified_and_disjoint():
    a, b = images.load_digits(split_seed=0), images.load_digits(split_seed=0)
    assert a.train_images.shape == (1437, 8, 8, 1) and a.test_images.shape == (360, 8, 8, 1)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    assert a.pixel_max == 16 and a.train_images.max() == 16 and a.train_images.dtype == np.uint8
    counts = np.bincount(a.test_labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # ~180 per class in 1,797, a fifth of each in test
    assert np.bincount(a.train_labels, minlength=10).min() >= 135  # stratified: every class on both sides


def test_batch_indices_cover_each_epoch_once_and_depend_only_on_step():
    n, b = 10, 4
    stream = np.concatenate([images.batch_indices(n, b, seed=3, step=s) for s in range(5)])  # 20 = two epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:])  # a fresh order each epoch
    np.testing.assert_array_equal(images.batch_indices(n, b, seed=3, step=3), stream[12:16])


def numpy_translate(image, dy, dx):
    """Independent reference: out[i, j] = image[i - dy, j - dx] inside the image, 0 elsewhere."""
    out = np.zeros_like(image)
    height, width = image.shape[:2]
    out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        image[max(-dy, 0):height - max(dy, 0), max(-dx, 0):width - max(dx, 0)]
    return out


def test_translate_equals_numpy_shift_with_zero_fill():
    x = np.random.default_rng(0).integers(1, 255, size=(3, 5, 6, 2)).astype(np.float32)
    shifts = np.array([[1, -2], [0, 0], [-1, 2]])
    got = np.asarray(images.translate(jnp.asarray(x), jnp.asarray(shifts), max_shift=2))
    np.testing.assert_array_equal(got, np.stack([numpy_translate(im, *s) for im, s in zip(x, shifts)]))


def test_cifar_preprocessing_on_a_synthetic_batch():
    batch = np.random.default_rng(0).integers(0, 256, size=(16, 32, 32, 3)).astype(np.uint8)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    out = images.preprocess(jnp.asarray(batch), None, 255, mean, std)
    assert out.shape == (16, 32, 32, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, (batch / 255.0 - np.array(mean)) / np.array(std), rtol=1e-5, atol=1e-5)
    # Flips only (max_shift=0): each image comes back as itself or mirrored left-right, and both happen.
    flipped = np.asarray(images.augment(jnp.asarray(batch, jnp.float32), jax.random.PRNGKey(0), max_shift=0,
                                        flip=True))
    same = [np.array_equal(f, x) for f, x in zip(flipped, batch)]
    mirrored = [np.array_equal(f, x[:, ::-1]) for f, x in zip(flipped, batch)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)
    # Shifts of up to 4 pixels each way: every image is one of the 81 translations of itself, not all the identity.
    shifted = np.asarray(images.augment(jnp.asarray(batch, jnp.float32), jax.random.PRNGKey(1), max_shift=4,
                                        flip=False))
    candidates = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)]
    found = []
    for out, x in zip(shifted, batch.astype(np.float32)):
        found += [(dy, dx) for dy, dx in candidates if np.array_equal(out, numpy_translate(x, dy, dx))]
    assert len(found) == len(batch)  # random pixels: exactly one translation matches each
    assert any(s != (0, 0) for s in found)


def shrink(config):
    """Two steps of a one-layer model, logged, evaluated and checkpointed at the end."""
    config.model.num_layers = 1
    config.num_train_steps = 2
    config.optimizer.warmup_steps = 1
    config.log_every = config.eval_every = config.checkpoint.every = 2
    return config


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_digits_config_trains_two_steps(tmp_path):
    config = shrink(vit_digits.get_config())
    config.model.update(d_model=16, d_ff=32)
    results = vision_training.train_and_evaluate(config, str(tmp_path))
    assert results["step"] == 2 and results["test_examples"] == 360 and 0.0 <= results["test_accuracy"] <= 1.0
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["test_accuracy"] == results["test_accuracy"]
    assert "2" in os.listdir(tmp_path / "checkpoints")
    records = [(r["step"], sorted(k for k in r if "/" in k)) for r in read_metrics(tmp_path)]
    assert records == [(2, ["train/accuracy", "train/grad_norm", "train/images_per_s", "train/learning_rate",
                            "train/loss", "train/step_time"]), (2, ["eval/accuracy", "eval/loss"])]


@pytest.mark.slow
def test_cifar10_config_trains_two_steps_on_synthetic_images(tmp_path):
    config = shrink(vit_cifar10.get_config("Ti"))
    config.model.update(d_model=24, d_ff=32, dtype="float32")
    config.data.update(batch_size=16, eval_batch_size=16)
    rng = np.random.default_rng(0)
    data = images.from_arrays(rng.integers(0, 256, (32, 32, 32, 3)), rng.integers(0, 10, 32),
                              rng.integers(0, 256, (20, 32, 32, 3)), rng.integers(0, 10, 20), num_classes=10,
                              pixel_max=255)
    results = vision_training.train_and_evaluate(config, str(tmp_path), data=data)
    assert results["step"] == 2 and results["test_examples"] == 20  # 16 + 4 (the second batch padded)
    assert np.isfinite(results["test_loss"]) and np.isfinite(results["train_loss"])


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path):
    """2 steps, then the same command with 4: the result of 4 steps in one go (constant learning rate,
    so the schedule does not depend on num_train_steps; dropout and augmentation keyed by the step)."""
    def config(steps):
        c = vit_digits.get_config()
        c.model.update(num_layers=1, d_model=16, d_ff=32)
        c.optimizer.update(schedule="constant", warmup_steps=None)
        c.num_train_steps, c.log_every, c.eval_every, c.checkpoint.every = steps, 1, 2, 2
        return c

    straight = vision_training.train_and_evaluate(config(4), str(tmp_path / "straight"))
    vision_training.train_and_evaluate(config(2), str(tmp_path / "resumed"))
    resumed = vision_training.train_and_evaluate(config(4), str(tmp_path / "resumed"))
    assert resumed["step"] == straight["step"] == 4
    np.testing.assert_allclose(resumed["test_loss"], straight["test_loss"], rtol=1e-6)
    np.testing.assert_allclose(resumed["train_loss"], straight["train_loss"], rtol=1e-6)
    assert [r["step"] for r in read_metrics(tmp_path / "resumed") if "train/loss" in r] == [1, 2, 3, 4]


@pytest.mark.slow
def test_digits_config_reaches_97_percent(tmp_path):
    results = vision_training.train_and_evaluate(vit_digits.get_config(), str(tmp_path))
    assert results["test_accuracy"] >= 0.97, results
