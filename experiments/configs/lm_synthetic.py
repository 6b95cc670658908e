"""Causal language modelling (DecoderOnly) on a synthetic Markov-chain corpus. No data needed."""

from experiments.configs import defaults


def get_config():
    config = defaults.base_config()
    config.objective = "lm"
    config.model = defaults.model_fields("tiny")
    defaults.synthetic_data(config, batch_size=32, max_length=32, vocab_size=32)
    config.optimizer.schedule = "inverse_sqrt"
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 50
    config.num_train_steps = 300
    config.log_every = 20
    config.eval_every = 100
    config.checkpoint.every = 300
    return config
