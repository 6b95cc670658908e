"""Input pipeline figures on Multi30k: padding efficiency and throughput against a training step.

    python -m experiments.benchmarks.input_pipeline --workdir /tmp/pipeline_bench

Prints, for one epoch of Multi30k train (En->De, joint SentencePiece vocabulary):
  * padding efficiency = real tokens / token slots (inputs and targets together) for plain padding
    (to max_length, and to the longest row of each batch), length bucketing and packing;
  * pipeline throughput (TFDS array_record reads, tokenisation, batching) in examples and real
    tokens per second;
  * what one jitted training step (forward, backward, Adam) of the given model presets consumes on
    this machine, in real tokens per second, on a batch of the same token budget.
Not a test: figures depend on the machine.
"""

import os
import time

import jax
import jax.numpy as jnp
import optax
from absl import flags

import transformer as tfm
from experiments import cli
from transformer import data

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_DATA_DIR = flags.DEFINE_string("multi30k_dir", os.environ.get("MULTI30K_DIR") or
                                os.path.join(_REPO, "..", "shared", "data", "multi30k"), "Multi30k raw *.gz files.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/input_pipeline_bench", "Where the TFDS data and vocabulary go.")
_VOCAB = flags.DEFINE_integer("vocab_size", 8000, "SentencePiece vocabulary size.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 64, "Longest example (tokens, with eos); Multi30k's is ~55.")
_TOKENS = flags.DEFINE_integer("tokens_per_batch", 4096, "Token budget per batch and side (bucketing).")
_PRESETS = flags.DEFINE_list("presets", ["tiny", "base"], "Model presets whose train step is timed.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed train steps per preset (after one compile step).")


def one_epoch(train, tok, batching: str) -> dict:
    """Drains one epoch, returning efficiency and throughput figures."""
    kwargs = dict(tokens_per_batch=_TOKENS.value) if batching == "bucket" else dict(
        batch_size=_TOKENS.value // _MAX_LENGTH.value)
    it = data.translation_batches(train, tok, batching=batching, max_length=_MAX_LENGTH.value, num_epochs=1,
                                  drop_remainder=False, **kwargs)
    start = time.perf_counter()
    batches = list(it)
    seconds = time.perf_counter() - start
    real = sum(int((b[k] > 0).sum()) for b in batches for k in ("inputs", "targets"))
    slots = sum(b[k].size for b in batches for k in ("inputs", "targets"))
    # Padding to each batch's longest row instead (shapes then vary from batch to batch).
    longest = sum(len(b[k]) * int((b[k] > 0).sum(axis=1).max()) for b in batches for k in ("inputs", "targets"))
    segments = sum(int(b["targets_segment_ids"].max(axis=1).sum()) for b in batches) if batching == "pack" else sum(
        int((b["targets"] > 0).any(axis=1).sum()) for b in batches)
    return dict(batches=batches, seconds=seconds, real=real, efficiency=real / slots, longest=real / longest,
                examples=segments, shapes=sorted({b["inputs"].shape for b in batches}))


def step_tokens_per_second(preset: str, vocab_size: int, batch: dict) -> tuple[float, float]:
    """(seconds per train step, real tokens per second it consumes) for `preset` on `batch`."""
    model = tfm.EncoderDecoder(tfm.ModelConfig.preset(preset, vocab_size=vocab_size))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    params = model.init(jax.random.key(0), batch["inputs"], batch["targets"])["params"]
    tx = optax.adam(1e-4)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(params):
            logits = model.apply({"params": params}, **batch, deterministic=False, rngs={"dropout": jax.random.key(1)})
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
            weights = batch["targets"] > 0
            return (loss * weights).sum() / weights.sum()
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    params, opt_state = jax.block_until_ready(step(params, opt_state, batch))  # compile
    start = time.perf_counter()
    for _ in range(_STEPS.value):
        params, opt_state = step(params, opt_state, batch)
    jax.block_until_ready(params)
    seconds = (time.perf_counter() - start) / _STEPS.value
    real = int((batch["inputs"] > 0).sum() + (batch["targets"] > 0).sum())
    return seconds, real / seconds


def main(argv):
    del argv
    workdir = _WORKDIR.value
    start = time.perf_counter()
    train = data.load_translation_split("multi30k", "train", data_dir=os.path.join(workdir, "tfds"),
                                        manual_dir=_DATA_DIR.value)
    print(f"Multi30k train: {len(train)} pairs, TFDS prepare/load {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    tok = data.load_or_train_tokenizer(os.path.join(workdir, f"spm_{_VOCAB.value}"),
                                       texts=lambda: data.translation_texts(train), vocab_size=_VOCAB.value)
    print(f"Vocabulary: {tok.vocab_size} pieces, train/load {time.perf_counter() - start:.1f} s")
    print(f"max_length={_MAX_LENGTH.value}, tokens_per_batch={_TOKENS.value} "
          f"(pad/pack batch_size={_TOKENS.value // _MAX_LENGTH.value}), {os.cpu_count()} CPUs\n")
    print(f"{'batching':<8} {'batches':>7} {'shapes':>6} {'efficiency':>10} {'(pad to longest)':>16} "
          f"{'examples/s':>10} {'tokens/s':>9}")
    results = {}
    for batching in ("pad", "bucket", "pack"):
        r = results[batching] = one_epoch(train, tok, batching)
        print(f"{batching:<8} {len(r['batches']):>7} {len(r['shapes']):>6} {r['efficiency']:>10.1%} "
              f"{r['longest']:>16.1%} {r['examples'] / r['seconds']:>10.0f} {r['real'] / r['seconds']:>9.0f}")
    batch = results["pack"]["batches"][0]
    for preset in _PRESETS.value:
        seconds, tokens_per_second = step_tokens_per_second(preset, tok.vocab_size, batch)
        print(f"train step, {preset:<5} preset, packed [{batch['inputs'].shape[0]}, {batch['inputs'].shape[1]}] batch: "
              f"{seconds * 1e3:.0f} ms, {tokens_per_second:.0f} real tokens/s consumed")


if __name__ == "__main__":
    cli.run(main)
