"""BERT-style masked language modelling (EncoderOnly) on a synthetic Markov-chain corpus.

The LM experiment's settings with the MLM objective; the vocabulary has one more id, [MASK].
"""

from experiments.configs import lm_synthetic


def get_config():
    config = lm_synthetic.get_config()
    config.objective = "mlm"
    config.data.vocab_size = 33  # the last id is [MASK]
    return config
