"""Training-step speed of the presets on this machine: step time, real tokens/s, GFLOP/s, MFU.

    python -m experiments.benchmarks.train_step --presets=tiny,base --batch_size=32 --length=64
    python -m experiments.benchmarks.train_step --presets=base --dtype=bfloat16 --peak_tflops=989  # H100

Times the compiled `Trainer.train_step` (forward, backward, Adam; dropout on) on synthetic
full-length rows, after a warm-up step, over `--steps` steps. FLOPs are the matmul FLOPs of
`transformer.metrics.flops_per_token` (6 x parameters-ish, attention included).
"""

import time

import jax
from absl import flags

from experiments.configs import defaults
from experiments import cli
from transformer import metrics, sharding, training
from transformer.data import synthetic

_PRESETS = flags.DEFINE_list("presets", ["tiny", "base"], "ModelConfig presets to time.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Rows per step.")
_LENGTH = flags.DEFINE_integer("length", 64, "Tokens per row (source and target).")
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "Vocabulary size.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.19, "Peak TFLOP/s of all devices for MFU "
                           "(default: 0.19, XLA's fp32 matmul rate on the 2-core CPU we develop on).")


def main(argv):
    del argv
    print(f"JAX {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}; "
          f"batch {_BATCH.value} x {_LENGTH.value} tokens, vocab {_VOCAB.value}, {_DTYPE.value}")
    for preset in _PRESETS.value:
        config = defaults.base_config()
        config.model = defaults.model_fields(preset)
        config.model.dtype = _DTYPE.value
        defaults.synthetic_data(config, task="copy", batch_size=_BATCH.value, max_length=_LENGTH.value,
                                vocab_size=_VOCAB.value)
        config.optimizer.update(schedule="constant", learning_rate=1e-4)
        model_cfg = training.model_config(config, _VOCAB.value)
        trainer = training.Trainer(config, model_cfg, sharding.make_mesh(data=-1))
        state = trainer.init_state(0)
        # Full rows: every position a real token, so tokens/s counts no padding.
        batch = synthetic.synthetic_batch("copy", 0, seed=0, batch_size=_BATCH.value, length=_LENGTH.value,
                                          vocab_size=_VOCAB.value)
        batch = {k: (v % (_VOCAB.value - 2)) + 2 for k, v in batch.items()}
        batch = trainer.to_global(batch)
        state, out = trainer.train_step(state, batch)
        jax.block_until_ready(out)
        start = time.perf_counter()
        for _ in range(_STEPS.value):
            state, out = trainer.train_step(state, batch)
        jax.block_until_ready(out)
        step_time = (time.perf_counter() - start) / _STEPS.value
        tokens = _BATCH.value * _LENGTH.value
        flops = tokens * metrics.flops_per_token(
            d_model=model_cfg.d_model, d_ff=model_cfg.d_ff, num_heads=model_cfg.num_heads,
            num_encoder_layers=model_cfg.num_encoder_layers, num_decoder_layers=model_cfg.num_decoder_layers,
            vocab_size=model_cfg.vocab_size, source_length=_LENGTH.value, target_length=_LENGTH.value)
        params = sum(x.size for x in jax.tree.leaves(state.params))
        print(f"{preset:5s} {params / 1e6:6.1f}M params | step {step_time * 1e3:8.1f} ms | "
              f"{tokens / step_time:8.0f} target tokens/s | {flops / step_time / 1e9:6.1f} GFLOP/s | "
              f"MFU {flops / step_time / (_PEAK.value * 1e12):5.1%}")


if __name__ == "__main__":
    cli.run(main)
