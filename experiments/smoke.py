"""A forward and backward pass of a small Transformer of each family, printing what it did.

    python -m experiments.smoke
"""

import time

import jax
import jax.numpy as jnp
from absl import app

import transformer as tfm


def main(argv):
    del argv
    cfg = tfm.ModelConfig.preset("tiny", vocab_size=1000)
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}: {cfg}")
    inputs = jax.random.randint(jax.random.key(0), (8, 24), 1, cfg.vocab_size)
    targets = jax.random.randint(jax.random.key(1), (8, 20), 1, cfg.vocab_size)
    for model_cls, args in ((tfm.EncoderDecoder, (inputs, targets)), (tfm.DecoderOnly, (targets,)),
                            (tfm.EncoderOnly, (inputs,))):
        model = model_cls(cfg)
        params = model.init(jax.random.key(2), *args)["params"]
        labels = args[-1]

        @jax.jit
        def loss_and_grad(params):
            def loss(params):
                logits = model.apply({"params": params}, *args, rngs={"dropout": jax.random.key(3)})
                log_probs = jax.nn.log_softmax(logits)
                return -jnp.mean(jnp.take_along_axis(log_probs, labels[..., None], -1))
            return jax.value_and_grad(loss)(params)

        start = time.perf_counter()
        value, grads = jax.block_until_ready(loss_and_grad(params))
        compile_and_run = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(loss_and_grad(params))
        step = time.perf_counter() - start
        num_params = sum(p.size for p in jax.tree.leaves(params))
        grad_norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
        print(f"{model_cls.__name__:15s} params {num_params:,}  loss {float(value):.3f}  |grad| {float(grad_norm):.3f}"
              f"  first call {compile_and_run:.1f}s  step {step * 1e3:.1f} ms")


if __name__ == "__main__":
    app.run(main)
