"""Synthetic copy task: a tiny EncoderDecoder learns to copy its input. No data needed.

    python -m experiments.train --config=experiments/configs/copy.py --workdir=/tmp/copy
    # variants: --config=experiments/configs/copy.py:reverse  (or :sort)
"""

from experiments.configs import defaults


def get_config(task: str = "copy"):
    config = defaults.base_config()
    config.model = defaults.model_fields("tiny")
    config.model.dropout_rate = 0.0  # a noiseless task: no regularisation needed
    defaults.synthetic_data(config, task=task, batch_size=32, max_length=16, vocab_size=16)
    config.optimizer.schedule = "inverse_sqrt"
    config.optimizer.learning_rate = 5e-3
    config.optimizer.warmup_steps = 50
    config.label_smoothing = 0.0
    config.num_train_steps = 500
    config.log_every = 20
    config.eval_every = 100
    config.checkpoint.every = 250
    return config
