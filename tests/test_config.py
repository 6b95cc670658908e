"""ModelConfig presets and validation."""

import dataclasses

import pytest

from transformer import ModelConfig


def test_presets_follow_paper_table_3():
    base = ModelConfig.preset("base", vocab_size=37000)
    assert (base.d_model, base.d_ff, base.num_heads, base.num_encoder_layers, base.num_decoder_layers) == (
        512, 2048, 8, 6, 6)
    assert base.dropout_rate == 0.1 and base.head_dim == 64 and base.vocab_size == 37000
    big = ModelConfig.preset("big")
    assert (big.d_model, big.d_ff, big.num_heads, big.dropout_rate) == (1024, 4096, 16, 0.3)
    assert ModelConfig.preset("tiny", num_decoder_layers=1).num_decoder_layers == 1


@pytest.mark.parametrize("overrides, message", [
    (dict(d_model=500, num_heads=8), "d_model=500 is not divisible by num_heads=8"),
    (dict(num_kv_heads=3), "num_kv_heads=3 must be a positive divisor"),
    (dict(dropout_rate=1.0), r"dropout_rate=1.0 is outside \[0, 1\)"),
    (dict(attention_dropout_rate=-0.1), "attention_dropout_rate"),
    (dict(attention="flash"), "attention='flash' is not one of"),
    (dict(position="absolute"), "position='absolute' is not one of"),
    (dict(activation="tanh"), "activation='tanh'"),
    (dict(norm="batchnorm"), "norm='batchnorm'"),
    (dict(norm_position="middle"), "norm_position='middle'"),
    (dict(dtype="float64"), "dtype='float64'"),
    (dict(vocab_size=0), "vocab_size=0 must be a positive integer"),
    (dict(num_encoder_layers=-1), "num_encoder_layers=-1 must be a non-negative integer"),
    (dict(sliding_window=0), "sliding_window=0 must be positive"),
    (dict(d_model=24, num_heads=8, position="rope"), "needs an even head dimension"),
])
def test_invalid_values_raise_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.preset("base", **overrides)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="Unknown ModelConfig preset 'huge'"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match=r"Unknown ModelConfig field\(s\) \['d_modle'\]"):
        ModelConfig.preset("base", d_modle=512)


def test_frozen():
    cfg = ModelConfig.preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 3
    assert cfg.replace(d_model=128).d_model == 128
