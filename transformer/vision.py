"""The Vision Transformer (Dosovitskiy et al. 2021): the paper's encoder over image patches.

An image is cut into non-overlapping P x P patches, each flattened and projected linearly to
d_model (ViT, eq. 1); a learned class token may lead the sequence; position embeddings are added;
the unchanged `transformer.models.Encoder` stack runs over it (its position encodings, dropout,
layers and final norm, all from the ModelConfig); a linear head classifies the class token's
state or the mean of the patch states.

    model = ViT(ModelConfig.preset("tiny", position="learned", max_len=17, norm_position="pre"),
                VisionConfig(image_size=8, channels=1, patch_size=2, pooling="cls", num_classes=10))
    logits = model.apply(params, images)  # images [B, 8, 8, 1] float -> logits [B, 10]

The encoder's hyperparameters are a ModelConfig; what is particular to images is a `VisionConfig`.
ViT's own recipe is position="learned", norm_position="pre", activation="gelu".

Legend (with attention.py's): B batch, S sequence (patches, plus the class token), D model,
P patch size, C channels, I = P * P * C pixels per patch, L classes.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from transformer import precision
from transformer.attention import dense_kernel
from transformer.config import ModelConfig
from transformer.models import Encoder

POOLINGS = ("cls", "mean")  # the class token's final state (ViT) or the mean of the patches' (GAP)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """What a ViT needs beyond the encoder's ModelConfig. Images are square."""

    image_size: int = 8  # height = width, in pixels
    channels: int = 1  # 1 greyscale, 3 RGB
    patch_size: int = 2  # P: non-overlapping P x P patches (ViT-B/16: 16)
    pooling: str = "cls"  # one of POOLINGS
    num_classes: int = 10  # L

    def __post_init__(self):
        for name in ("image_size", "channels", "patch_size", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"VisionConfig.{name}={value!r} must be a positive integer.")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"VisionConfig.image_size={self.image_size} is not divisible by patch_size={self.patch_size}: "
                "patches do not overlap and must tile the image; choose a patch_size that divides image_size.")
        if self.pooling not in POOLINGS:
            raise ValueError(f"VisionConfig.pooling={self.pooling!r} is not one of {list(POOLINGS)}.")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def sequence_length(self) -> int:
        """S: the patches, plus one for the class token."""
        return self.num_patches + (self.pooling == "cls")

    def check_model(self, model_cfg: ModelConfig) -> None:
        """Raises ValueError if `model_cfg` cannot encode this config's patch sequences."""
        if model_cfg.num_encoder_layers < 1:
            raise ValueError("ModelConfig.num_encoder_layers=0: a ViT needs at least one encoder layer.")
        if model_cfg.position == "learned" and model_cfg.max_len < self.sequence_length:
            raise ValueError(
                f"ModelConfig.max_len={model_cfg.max_len} is shorter than the {self.sequence_length} positions of a "
                f"{self.image_size}x{self.image_size} image in {self.patch_size}x{self.patch_size} patches"
                f"{' plus the class token' if self.pooling == 'cls' else ''}: set max_len >= {self.sequence_length} "
                "(the learned position table's size).")


def patchify(images, patch_size: int):
    """[B, H, W, C] -> [B, S, I], S = (H / P) * (W / P) patches in row-major order, I = P * P * C
    pixels of each in (row, column, channel) order."""
    batch, height, width, channels = images.shape
    p = patch_size
    x = images.reshape(batch, height // p, p, width // p, p, channels)  # [B, H/P, P, W/P, P, C]
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, H/P, W/P, P, P, C]
    return x.reshape(batch, (height // p) * (width // p), p * p * channels)


class PatchEmbedding(nn.Module):
    """Non-overlapping patches projected to d_model: x_p E + b (ViT, eq. 1); a stride-P convolution."""

    d_model: int
    patch_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        """[B, H, W, C] -> [B, S, D]."""
        patches = patchify(images, self.patch_size).astype(self.dtype)  # [B, S, I]
        kernel = dense_kernel(self, "kernel", (patches.shape[-1], self.d_model), (None, "embed"))  # [I, D]
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (self.d_model,))
        return precision.einsum("BSI,ID->BSD", patches, kernel, self.dtype) + bias.astype(self.dtype)


class ViT(nn.Module):
    """Patch embedding -> [class token] -> `Encoder` (adds the positions) -> pooling -> linear head.

    Dropout is on when the call is given a 'dropout' rng and off otherwise, unless `deterministic`
    says so. ModelConfig.vocab_size is not read: there are no tokens to embed.
    """

    config: ModelConfig
    vision: VisionConfig

    @nn.compact
    def __call__(self, images, *, deterministic: bool | None = None):
        """images [B, H, W, C] float (normalised) -> logits [B, L] float32."""
        cfg, vision = self.config, self.vision
        expected = (vision.image_size, vision.image_size, vision.channels)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(f"ViT expects images [B, {', '.join(map(str, expected))}] (VisionConfig), got "
                             f"{list(images.shape)}.")
        vision.check_model(cfg)
        deterministic = (not self.has_rng("dropout")) if deterministic is None else deterministic
        x = PatchEmbedding(cfg.d_model, vision.patch_size, cfg.compute_dtype, name="patch_embedding")(images)
        batch = x.shape[0]
        if vision.pooling == "cls":
            # ViT initialises the class token to zeros; its position embedding tells it apart.
            token = self.param("cls_token", nn.with_logical_partitioning(nn.initializers.zeros, (None, None, "embed")),
                               (1, 1, cfg.d_model))
            x = jnp.concatenate([jnp.broadcast_to(token.astype(x.dtype), (batch, 1, cfg.d_model)), x], axis=1)
        length = x.shape[1]
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))  # [B, S]
        valid = jnp.ones((batch, length), bool)  # no padding: every image has all its patches
        x = Encoder(cfg, name="encoder")(x, valid, None, positions, deterministic=deterministic)  # [B, S, D]
        pooled = x[:, 0] if vision.pooling == "cls" else jnp.mean(x, axis=1)  # [B, D]
        # NOTE: a zero-initialised head (as ViT's) starts at uniform predictions, not random ones.
        kernel = self.param("head_kernel", nn.with_logical_partitioning(nn.initializers.zeros, ("embed", None)),
                            (cfg.d_model, vision.num_classes))  # [D, L]
        bias = self.param("head_bias", nn.initializers.zeros, (vision.num_classes,))
        logits = precision.einsum("BD,DL->BL", pooled, kernel, cfg.compute_dtype, out_dtype=jnp.float32)
        return logits + bias
