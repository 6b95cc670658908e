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
    (dict(memory_length=-1), "memory_length=-1 must be a non-negative integer"),
    (dict(memory_length=16), "memory_length=16 .* needs relative positions.*rope', 'relative' or 'alibi'"),
    (dict(memory_length=16, position="learned"), "position='learned' is absolute"),
    (dict(memory_length=16, position="rope", attention="splash"), "attention='splash' cannot take"),
    (dict(memory_length=16, position="rope", attention="banded", sliding_window=8), "attention='banded' cannot take"),
    (dict(memory_length=16, position="rope", attention="lsh"), "attention='lsh' cannot take"),
    (dict(memory_length=16, position="rope", reversible=True, norm_position="pre"),
     "cannot be combined with reversible=True"),
    (dict(memory_length=16, position="rope", sliding_window=8, max_global_tokens=2),
     "cannot be combined with Longformer global"),
    (dict(attention="banded"), "attention='banded' .* needs sliding_window"),
    (dict(lsh_num_hashes=0), "lsh_num_hashes=0 must be a positive integer"),
    (dict(lsh_bucket_size=0), "lsh_bucket_size=0 must be a positive integer"),
    (dict(attention="lsh", position="relative"), "attention='lsh' .* takes no attention bias.*position='rope'"),
    (dict(attention="lsh", position="alibi"), "attention='lsh' .* takes no attention bias"),
    (dict(attention="lsh", num_kv_heads=2), "num_kv_heads=2 .* does not apply: set num_kv_heads=None"),
    (dict(attention="lsh", sliding_window=8), "attention='lsh' .* reads no sliding window"),
    (dict(reversible=True), "reversible=True .* set norm_position='pre'"),
    (dict(reversible=True, norm_position="pre", scan_layers=True), "set scan_layers=False and remat=False"),
    (dict(reversible=True, norm_position="pre", remat=True), "set scan_layers=False and remat=False"),
    (dict(attention="banded", sliding_window=8, position="alibi"), "'banded' takes no attention bias"),
    (dict(attention="banded", sliding_window=8, position="relative"), "'banded' takes no attention bias"),
    (dict(sliding_window_dilation=2), "sliding_window_dilation=2 shapes a sliding window"),
    (dict(sliding_window_dilation=0, sliding_window=8), "sliding_window_dilation=0 must be a positive integer"),
    (dict(max_global_tokens=4), "max_global_tokens=4 shapes a sliding window"),
    (dict(attention="splash", sliding_window=8, max_global_tokens=4), "'splash' reads no dilation or global"),
    (dict(attention="splash", sliding_window=8, sliding_window_dilation=2), "'splash' reads no dilation or global"),
    (dict(sliding_window=8, sliding_window_dilation=2, memory_length=16, position="rope"),
     "sliding_window_dilation=2 cannot be combined with memory_length"),
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
