"""ViT-Ti or ViT-S on TFDS cifar10 from scratch, for accelerators (Dosovitskiy et al. 2021, Table 1 sizes).

    python -m experiments.train_vision --config=experiments/configs/vit_cifar10.py:Ti --workdir=runs/vit_ti_cifar10
    python -m experiments.train_vision --config=experiments/configs/vit_cifar10.py:S --workdir=runs/vit_s_cifar10

The first run downloads cifar10 (~170 MB) into the TFDS data_dir and prepares it as array_record
(--config.data.data_dir=... to choose where). 32x32 images in 4x4 patches: 64 patches plus the
class token. ViTs without pre-training need strong augmentation on small data sets; here only the
classic random translations (a 4-pixel pad-and-crop) and flips, so expect less than a ResNet reaches.
Not trained to the end here (no accelerator, no download): the accuracy of this recipe is unmeasured.
"""

from experiments.configs import defaults

# Widths, depths and heads of ViT-Ti (Touvron et al. 2021) and ViT-S.
VARIANTS = {
    "Ti": dict(d_model=192, d_ff=768, num_heads=3, num_encoder_layers=12),
    "S": dict(d_model=384, d_ff=1536, num_heads=6, num_encoder_layers=12),
}


def get_config(variant: str = "Ti"):
    if variant not in VARIANTS:
        raise ValueError(f"Unknown ViT variant {variant!r}: choose one of {sorted(VARIANTS)} (vit_cifar10.py:Ti).")
    config = defaults.vision_config("base")
    config.model.update(**VARIANTS[variant], max_len=65, dropout_rate=0.0, dtype="bfloat16")
    config.image.update(image_size=32, channels=3, patch_size=4, pooling="cls", num_classes=10)

    config.data.update(name="cifar10", batch_size=512, eval_batch_size=1000)
    config.data.max_shift = 4  # the classic pad-4-and-crop
    config.data.flip = True

    # AdamW with a cosine schedule, as DeiT: ~200 epochs of 50,000 images at batch 512.
    config.optimizer.update(schedule="cosine", learning_rate=1e-3, warmup_steps=2000, weight_decay=0.05,
                            clip_grad_norm=1.0)
    config.label_smoothing = 0.1
    config.num_train_steps = 20_000
    config.log_every = 100
    config.eval_every = 1000
    config.checkpoint.every = 1000
    return config
