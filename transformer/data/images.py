"""Image classification data as in-memory arrays, and its preprocessing: pure functions of arrays.

    data = load_digits()                       # scikit-learn's bundled 8x8 digits: offline, no download
    data = load_cifar10(data_dir=None)         # TFDS cifar10 (downloads ~170 MB the first time)
    x = preprocess(batch_images, rng, data.pixel_max, data.mean, data.std, max_shift=1, flip=False)

Both splits of both datasets fit in memory (cifar10's 60k 32x32x3 uint8 images are 184 MB), so the
trainer draws every batch by index: the data order is a function of (seed, step) and a resumed run
needs no iterator state. Images stay uint8 [N, H, W, C] on the host; `preprocess` (jit-able)
augments and normalises them on the device.

Knows nothing of the model. Legend: B batch, N examples, H height, W width, C channels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

DIGITS_TEST_FRACTION = 0.2  # 1,797 images -> 1,437 train / 360 test


@dataclasses.dataclass(frozen=True)
class ImageData:
    """Both splits of a classification dataset, with the statistics that normalise its pixels."""

    train_images: np.ndarray  # [N, H, W, C] uint8, pixel values 0..pixel_max
    train_labels: np.ndarray  # [N] int32 in [0, num_classes)
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    pixel_max: int  # the brightest pixel value: 16 for digits, 255 for cifar10
    mean: tuple[float, ...]  # per channel, of train_images / pixel_max (the training split only)
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C)."""
        return tuple(self.train_images.shape[1:])


def from_arrays(train_images, train_labels, test_images, test_labels, *, num_classes: int,
                pixel_max: int) -> ImageData:
    """An ImageData whose normalising mean and std are measured on `train_images` (never the test split)."""
    train_images = np.asarray(train_images, np.uint8)
    if train_images.ndim != 4:
        raise ValueError(f"Images must be [N, H, W, C], got shape {train_images.shape}.")
    scaled = train_images.astype(np.float64) / pixel_max
    mean = tuple(float(m) for m in scaled.mean(axis=(0, 1, 2)))
    std = tuple(float(max(s, 1e-6)) for s in scaled.std(axis=(0, 1, 2)))
    return ImageData(train_images, np.asarray(train_labels, np.int32), np.asarray(test_images, np.uint8),
                     np.asarray(test_labels, np.int32), num_classes, pixel_max, mean, std)


def load_digits(split_seed: int = 0, test_fraction: float = DIGITS_TEST_FRACTION) -> ImageData:
    """scikit-learn's handwritten digits (UCI optdigits test set): 1,797 8x8 greyscale images, 10 classes.

    The data ships inside scikit-learn; nothing is downloaded. The split is stratified by class
    (`sklearn.model_selection.train_test_split`, `random_state=split_seed`): with the defaults,
    1,437 training and 360 test images, the same for every run with that seed.
    """
    from sklearn import datasets, model_selection  # scikit-learn is needed for this dataset only

    digits = datasets.load_digits()
    images = digits.images.astype(np.uint8)[..., None]  # [1797, 8, 8, 1], values 0..16
    train, test = model_selection.train_test_split(
        np.arange(len(images)), test_size=test_fraction, stratify=digits.target, random_state=split_seed)
    return from_arrays(images[train], digits.target[train], images[test], digits.target[test],
                       num_classes=10, pixel_max=16)


def load_cifar10(data_dir: str | None = None) -> ImageData:
    """TFDS cifar10: 50,000 training and 10,000 test 32x32 RGB images, 10 classes.

    Read through TFDS without TensorFlow, like every dataset here (`transformer.data.sources`):
    prepared once as array_record under `data_dir`, then read by random access.
    """
    from transformer.data import sources  # TFDS loads only when a TFDS dataset is asked for

    builder = sources.prepared_builder("cifar10", data_dir=data_dir)
    splits = {}
    for split in ("train", "test"):
        source = builder.as_data_source(split=split)
        records = [source[i] for i in range(len(source))]
        splits[split] = (np.stack([r["image"] for r in records]), np.array([r["label"] for r in records]))
    return from_arrays(*splits["train"], *splits["test"], num_classes=10, pixel_max=255)


# ---------------------------------------------------------------------------------------------
# Batches by index: the order is a pure function of (seed, step).


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The [B] training-example indices of step `step` (0-based): epoch after epoch, each a fresh
    permutation of the N examples, read `batch_size` at a time across epoch boundaries."""
    positions = step * batch_size + np.arange(batch_size)  # in the endless stream of epochs
    epochs, offsets = np.divmod(positions, num_examples)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        rows = epochs == epoch
        out[rows] = _epoch_permutation(num_examples, seed, int(epoch))[offsets[rows]]
    return out


# ---------------------------------------------------------------------------------------------
# Preprocessing on the device.


def translate(images, shifts, max_shift: int):
    """Each image moved by its own (dy, dx), the uncovered border filled with zeros.

    images [B, H, W, C]; shifts [B, 2] int with |dy|, |dx| <= max_shift -> [B, H, W, C]:
    out[b, i, j] = images[b, i - dy, j - dx] where that is inside the image, else 0.
    """
    height, width = images.shape[1:3]
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))

    def crop(image, shift):  # [H + 2m, W + 2m, C], [2] -> [H, W, C]
        start = (max_shift - shift[0], max_shift - shift[1], 0)
        return jax.lax.dynamic_slice(image, start, (height, width, image.shape[-1]))

    return jax.vmap(crop)(padded, shifts)


def augment(images, rng, *, max_shift: int, flip: bool):
    """Random translations of up to `max_shift` pixels each way and (if `flip`) random left-right flips.

    images [B, H, W, C] float -> [B, H, W, C]. Digits must not be flipped (a mirrored 2 is no digit);
    cifar10's objects may (as in He et al. 2016).
    """
    shift_rng, flip_rng = jax.random.split(rng)
    if max_shift:
        shifts = jax.random.randint(shift_rng, (images.shape[0], 2), -max_shift, max_shift + 1)
        images = translate(images, shifts, max_shift)
    if flip:
        flipped = jax.random.bernoulli(flip_rng, 0.5, (images.shape[0],))
        images = jnp.where(flipped[:, None, None, None], images[:, :, ::-1], images)
    return images


def normalize(images, pixel_max: int, mean, std):
    """[B, H, W, C] pixels in 0..pixel_max -> float32 with zero mean and unit variance per channel."""
    scaled = images.astype(jnp.float32) / pixel_max
    return (scaled - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def preprocess(images, rng, pixel_max: int, mean, std, *, max_shift: int = 0, flip: bool = False):
    """Training images: augmented in pixel space (borders fill with black), then normalised.

    images [B, H, W, C] uint8 -> [B, H, W, C] float32. `rng=None`: no augmentation (evaluation).
    """
    images = images.astype(jnp.float32)
    if rng is not None:
        images = augment(images, rng, max_shift=max_shift, flip=flip)
    return normalize(images, pixel_max, mean, std)
