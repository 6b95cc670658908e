"""Sample continuations from a trained language model (DecoderOnly).

    python -m experiments.sample --workdir=DIR --prompt="A man" [--temperature=0.8 --top_k=40 --top_p=0.95]

On a run over synthetic data, a prompt is token ids separated by spaces (e.g. --prompt="5 9 12").
An empty prompt samples unconditionally.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import cli
from transformer import decoding, inference, runtime, tokens

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a language-model training run.")
_PROMPT = flags.DEFINE_multi_string("prompt", [""], "Prompt(s); one sample each.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 64, "Tokens per sample, the prompt included.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature (> 0).", lower_bound=1e-6)
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest tokens (0 = all).", lower_bound=0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the smallest set with this probability.",
                            lower_bound=1e-6, upper_bound=1.0)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed: the same seed gives the same samples.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "latest", list(inference.CHECKPOINTS), "Which checkpoint to use.")
_STEP = flags.DEFINE_integer("step", None, "A saved step other than the newest.", lower_bound=0)
flags.mark_flags_as_required(["workdir"])


def encode_prompt(text: str, tokenizer, vocab_size: int) -> list[int]:
    """Token ids of `text`: SentencePiece pieces, or (synthetic runs) ids separated by spaces."""
    if tokenizer is not None:
        return tokenizer.encode(text)
    try:
        ids = [int(t) for t in text.split()]
    except ValueError:
        raise cli.UserError(f"--prompt={text!r}: this run has no tokenizer (synthetic data); give token ids separated "
                         "by spaces, e.g. --prompt='5 9 12'.") from None
    bad = [i for i in ids if not 0 < i < vocab_size]
    if bad:
        raise cli.UserError(f"--prompt={text!r}: ids {bad} are outside the vocabulary 1..{vocab_size - 1} (0 is padding).")
    return ids


def main(argv):
    del argv
    runtime.initialize()
    run, trainer, params, tokenizer, _ = inference.load_for_inference(_WORKDIR.value, _CHECKPOINT.value, _STEP.value)
    if run.objective != "lm":
        raise cli.UserError(f"{_WORKDIR.value} holds a {run.objective!r} run; sampling needs an 'lm' run.")
    model = trainer.model
    vocab_size = model.config.vocab_size
    if _TOP_K.value > vocab_size:
        raise cli.UserError(f"--top_k={_TOP_K.value} exceeds the vocabulary ({vocab_size} tokens).")
    if _MAX_LENGTH.value > model.config.max_len:
        raise cli.UserError(f"--max_length={_MAX_LENGTH.value} exceeds the model's max_len={model.config.max_len}.")
    prompts = [encode_prompt(p, tokenizer, vocab_size) for p in _PROMPT.value]
    if max(map(len, prompts)) >= _MAX_LENGTH.value:
        raise cli.UserError(f"A prompt is longer than --max_length={_MAX_LENGTH.value} tokens.")
    prompt = np.zeros((len(prompts), max(1, max(map(len, prompts)))), np.int32)
    for i, ids in enumerate(prompts):
        prompt[i, :len(ids)] = ids
    eos_id = tokenizer.eos_id if tokenizer else tokens.EOS_ID

    @jax.jit
    def generate(params, prompt, rng):
        cache = decoding.init_cache(model, params, _MAX_LENGTH.value, prompt.shape[0])
        return decoding.sample(decoding.decoder_only_step_fn(model, params), cache, prompt.shape[0],
                               _MAX_LENGTH.value, eos_id, rng=rng, temperature=_TEMPERATURE.value,
                               top_k=_TOP_K.value, top_p=_TOP_P.value, prompt=prompt)

    with trainer.context():
        samples = np.asarray(generate(params, jnp.asarray(prompt), jax.random.key(_SEED.value)))
    for row in samples:
        ids = row.tolist()
        print(tokenizer.decode(ids) if tokenizer else " ".join(str(t) for t in ids if t))


if __name__ == "__main__":
    cli.run(main)
