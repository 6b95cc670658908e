"""WMT 2014 English->German, Transformer big (Vaswani et al. 2017, Table 3, row "big").

Expected result (paper, Table 2): 28.4 BLEU on newstest2014 (tokenized BLEU), 300k steps on
8 P100 GPUs (3.5 days); the last 20 checkpoints averaged.

    python -m experiments.train --config=experiments/configs/wmt14_ende_big.py --workdir=runs/wmt14_big
    python -m experiments.average --workdir=runs/wmt14_big --num_checkpoints=20
    python -m experiments.evaluate --workdir=runs/wmt14_big --split=test --checkpoint=averaged
"""

from experiments.configs import wmt14_ende_base


def get_config():
    config = wmt14_ende_base.get_config()
    config.model.preset = "big"  # d_model 1024, d_ff 4096, 16 heads, dropout 0.3; base's overrides on top
    config.num_train_steps = 300_000
    config.checkpoint.keep = 20  # the paper averages the last 20 checkpoints for big models
    return config
