"""BERT-style masked language modelling (EncoderOnly) on a synthetic Markov-chain corpus."""

from experiments.configs import defaults


def get_config():
    config = defaults.base_config()
    config.objective = "mlm"
    config.model = defaults.model_fields("tiny")
    config.data.batch_size = 32
    config.data.max_length = 32
    config.data.vocab_size = 33  # the last id is [MASK]
    config.optimizer.schedule = "inverse_sqrt"
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 50
    config.num_train_steps = 300
    config.log_every = 20
    config.eval_every = 100
    config.checkpoint.every = 300
    return config
