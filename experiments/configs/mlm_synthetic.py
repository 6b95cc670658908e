"""BERT-style masked language modelling (EncoderOnly) on a synthetic Markov-chain corpus.

The LM experiment's settings with the MLM objective. The model has one output more than the text's
32 ids: [MASK] (`transformer.tokens`).
"""

from experiments.configs import lm_synthetic


def get_config():
    config = lm_synthetic.get_config()
    config.objective = "mlm"
    return config
