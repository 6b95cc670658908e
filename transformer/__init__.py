"""transformer: the Transformer of Vaswani et al. (2017), "Attention Is All You Need", in JAX/Flax.

    import transformer as tfm
    cfg = tfm.ModelConfig.preset("base", vocab_size=37000)
    model = tfm.EncoderDecoder(cfg)                 # also tfm.DecoderOnly, tfm.EncoderOnly
    variables = model.init(key, inputs, targets)    # int32 [batch, len]; 0 is padding
    logits = model.apply(variables, inputs, targets)
"""

from transformer.attention import MultiHeadAttention, dot_product_attention
from transformer.config import ModelConfig
from transformer.layers import DecoderLayer, EncoderLayer, FeedForward
from transformer.models import DecoderOnly, EncoderDecoder, EncoderOnly, shift_right

__all__ = [
    "DecoderLayer",
    "DecoderOnly",
    "EncoderDecoder",
    "EncoderLayer",
    "EncoderOnly",
    "FeedForward",
    "ModelConfig",
    "MultiHeadAttention",
    "dot_product_attention",
    "shift_right",
]
