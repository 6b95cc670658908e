"""Sample continuations from a trained language model (DecoderOnly).

    python -m experiments.sample --workdir=DIR --prompt="A man" [--temperature=0.8 --top_k=40 --top_p=0.95]
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from transformer import decoding, inference, runtime, tokens

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a language-model training run.")
_PROMPT = flags.DEFINE_multi_string("prompt", [""], "Prompt(s); one sample each.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 64, "Tokens per sample, the prompt included.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the smallest set with this probability.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed: the same seed gives the same samples.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "latest", ["latest", "averaged"], "Which checkpoint to use.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    runtime.initialize()
    run, trainer, params, tokenizer, _ = inference.load_for_inference(_WORKDIR.value, _CHECKPOINT.value)
    if run.objective != "lm":
        raise app.UsageError(f"{_WORKDIR.value} holds a {run.objective!r} run; sampling needs an 'lm' run.")
    model = trainer.model
    encode = tokenizer.encode if tokenizer else (lambda text: [int(t) for t in text.split()])
    prompts = [encode(p) for p in _PROMPT.value]
    if max(map(len, prompts)) >= _MAX_LENGTH.value:
        raise app.UsageError(f"A prompt is longer than --max_length={_MAX_LENGTH.value} tokens.")
    prompt = np.zeros((len(prompts), max(1, max(map(len, prompts)))), np.int32)
    for i, ids in enumerate(prompts):
        prompt[i, :len(ids)] = ids
    eos_id = tokenizer.eos_id if tokenizer else tokens.EOS_ID

    @jax.jit
    def run(params, prompt, rng):
        cache = decoding.init_cache(model, params, _MAX_LENGTH.value, prompt.shape[0])
        return decoding.sample(decoding.decoder_only_step_fn(model, params), cache, prompt.shape[0],
                               _MAX_LENGTH.value, eos_id, rng=rng, temperature=_TEMPERATURE.value,
                               top_k=_TOP_K.value, top_p=_TOP_P.value, prompt=prompt)

    with trainer.context():
        tokens = np.asarray(run(params, jnp.asarray(prompt), jax.random.key(_SEED.value)))
    for row in tokens:
        ids = row.tolist()
        print(tokenizer.decode(ids) if tokenizer else " ".join(str(t) for t in ids if t))


if __name__ == "__main__":
    app.run(main)
