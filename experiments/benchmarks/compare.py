"""Our train step beside `torch.nn.Transformer`'s (and the Flax WMT example's), same shapes, one run.

    pip install torch   # the CPU build is enough: pip install "torch==2.13.0+cpu" where it is offered
    python -m experiments.benchmarks.compare
    python -m experiments.benchmarks.compare --shapes=multi30k,base_32k --steps=3 --rounds=3
    python -m experiments.benchmarks.compare --dtype=bfloat16 --flax_wmt_dir=PATH/flax/examples/wmt
    python -m experiments.benchmarks.compare --shapes=multi30k --dtype=bfloat16 --peer_dtypes=float32,bfloat16

All sides train an encoder-decoder with one shared embedding (scaled by sqrt(d_model)), sinusoidal
positions and the tied output projection, on the same full rows of random tokens: forward,
label-smoothed (0.1) cross entropy, backward, Adam (0.9, 0.98, 1e-9), dropout on, in `--dtype`.
torch's layers also drop attention weights and the feed-forward's hidden activations (ours drop
sub-layer outputs and embedding sums, the paper's places): torch does more dropout work. The Flax
WMT example's model (`--flax_wmt_dir`, pre-norm, no attention dropout here) is imported from a
flax checkout, and trained by a step written here after the example's train.py (a soft one-hot
loss and argmax accuracy over the whole logits). Parameter counts are printed (within 1%). Steps
alternate between the sides, `--rounds` times after `--warmup_rounds` untimed ones, each round
starting one side later than the one before, and the median of each side counts, so drift on a
shared machine hits all alike. The page faults each side took in its timed rounds are printed under
the table: a side whose step allocates more than the memory freed before it takes fresh pages from
the kernel, and runs slower in that round (the Flax WMT model's float32 step, whose logits are not
fused with the loss, took up to 2.8 GB of them in a round beside the four other sides on 2026-12-07,
and ran ~20% slower). `--peer_dtypes=float32,bfloat16` times each peer in both dtypes and adds
`ours / PEER best`, the ratio against the peer's faster step: our step in `--dtype` (the recipes compute
in bfloat16 on a CPU that has it) against each peer as it runs fastest here (on a CPU the Flax WMT
model often runs slower in bfloat16 than in float32, torch faster); with both peers that is five
sides in one process, a peak RSS of 22 GiB for `--shapes=base_8k,big_32k` on 2026-12-07 (on 24 GiB,
one shape a run). FLOPs are the analytic matmul count of `transformer.metrics.flops_per_token`; the
peak is the faster of JAX's and torch's [2048, 2048] (`--peak_size`) matmul rates in each dtype
timed, measured in this run before the first shape and again after each (the best of `--peak_rounds`
rounds each time); a row's fractions are of the highest peak measured up to its end (one measurement
at the start alone read 25% low on a Zen 5 on 2026-12-06). Ours runs as shipped for CPU:
`--loss_block_tokens=256`. Each side's fraction is of the peak in its own dtype.
"""

import math
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import cli
from experiments.configs import defaults
from transformer import metrics, runtime, sharding, training

# name: (vocab, d_model, heads, d_ff, layers per stack, batch, length, dropout)
SHAPES = {
    "multi30k": (8000, 128, 4, 256, 4, 64, 64, 0.2),
    "base_8k": (8192, 512, 8, 2048, 6, 32, 64, 0.1),
    "base_32k": (32000, 512, 8, 2048, 6, 32, 64, 0.1),
    "big_32k": (32000, 1024, 16, 4096, 6, 8, 64, 0.3),
}

_SHAPES = flags.DEFINE_list("shapes", list(SHAPES), f"Which shapes: {', '.join(SHAPES)}.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per round and side.", lower_bound=1)
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds (ours, torch, ours, ...).", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup_rounds", 1, "Untimed rounds of every side, in the same alternation, before "
                               "the timed ones.", lower_bound=0)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype of both sides: ours ModelConfig.dtype (float32 master weights, "
                           "bf16 x bf16 -> f32 products), torch's torch.autocast(dtype=...).")
_LOSS_BLOCK = flags.DEFINE_integer("loss_block_tokens", 256, "Our ModelConfig.loss_block_tokens: 0 = loss over the "
                                   "whole logits; N = output projection and loss fused, N positions at a time.",
                                   lower_bound=0)
_FLAX_WMT = flags.DEFINE_string("flax_wmt_dir", None, "Also time the Flax WMT example's model: the examples/wmt "
                                 "directory of a github.com/google/flax checkout (its models.py is imported from "
                                 "there, not copied here).")
_PEER_DTYPES = flags.DEFINE_list(
    "peer_dtypes", None, "The peers' compute dtypes (default: --dtype). With both, each peer is timed in each and "
    "`ours / PEER best` is against the faster: our step in --dtype against each peer at its best on this machine.")
_PEAK_ROUNDS = flags.DEFINE_integer("peak_rounds", 3, "Rounds of 10 square products per peak measurement (the best "
                                    "counts).", lower_bound=1)
_PEAK_SIZE = flags.DEFINE_integer("peak_size", 2048, "n of the [n, n] @ [n, n] products that measure the peak.",
                                  lower_bound=16)
_PRNG = flags.DEFINE_enum("prng_impl", "", ["", "threefry2x32", "rbg", "unsafe_rbg"],
                          "Our dropout masks' PRNG (jax_default_prng_impl; '' = JAX's default, threefry).")


def matmul_gflops(dtype: str = "float32", n: int = 2048, repeats: int = 10, rounds: int = 3) -> tuple[float, float]:
    """[n, n] @ [n, n] GFLOP/s of JAX (XLA) and of torch on this machine, in `dtype` (bfloat16:
    JAX accumulates in float32, as our layers do): the best of `rounds` rounds of `repeats` products
    each, so that a slow moment (another process, a clock change) lowers one round, not the peak."""
    import torch  # noqa: PLC0415

    x = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))
    f(x).block_until_ready()
    t = torch.ones((n, n), dtype=getattr(torch, dtype))
    t @ t
    jax_rate = torch_rate = 0.0
    for _ in range(rounds):  # the libraries alternate, so drift hits both alike
        jax_rate = max(jax_rate, 2 * n**3 / timed(lambda: f(x), repeats) / 1e9)
        torch_rate = max(torch_rate, 2 * n**3 / timed(lambda: t @ t, repeats) / 1e9)
    return jax_rate, torch_rate


def timed(fn, calls: int) -> float:
    """Seconds per call of `fn()` (each call returns something to wait on), to completion."""
    start = time.perf_counter()
    for _ in range(calls):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def timed_steps(step, state, steps: int):
    """(state after `steps` calls of `step(state) -> (state, out)`, seconds per call, to completion)."""
    holder = [state]

    def call():
        holder[0], out = step(holder[0])
        return out

    seconds = timed(call, steps)
    return holder[0], seconds


def ours_trainer(vocab, d_model, heads, d_ff, layers, batch, length, dropout, dtype="float32", loss_block_tokens=0,
                 grad_accum_steps=1) -> training.Trainer:
    """Our Trainer at a shape of SHAPES: post-norm EncoderDecoder, shared embeddings, synthetic rows,
    a constant learning rate (the update's cost does not depend on it)."""
    config = defaults.base_config()
    config.model = defaults.model_fields("base")
    config.model.update(d_model=d_model, num_heads=heads, d_ff=d_ff, num_encoder_layers=layers,
                        num_decoder_layers=layers, dropout_rate=dropout, max_len=max(512, length), dtype=dtype,
                        loss_block_tokens=loss_block_tokens)
    defaults.synthetic_data(config, task="copy", batch_size=batch, max_length=length, vocab_size=vocab)
    config.optimizer.update(schedule="constant", learning_rate=1e-4, grad_accum_steps=grad_accum_steps)
    return training.Trainer(config, training.model_config(config, vocab), sharding.make_mesh(data=-1))


class Ours:
    def __init__(self, vocab, d_model, heads, d_ff, layers, batch, length, dropout, dtype="float32",
                 loss_block_tokens=0):
        self.trainer = ours_trainer(vocab, d_model, heads, d_ff, layers, batch, length, dropout, dtype,
                                    loss_block_tokens)
        self.state = self.trainer.init_state(0)
        rng = np.random.default_rng(0)
        rows = {k: rng.integers(2, vocab, size=(batch, length), dtype=np.int32) for k in ("inputs", "targets")}
        self.batch = self.trainer.to_global(rows)
        self.params = sum(x.size for x in jax.tree.leaves(self.state.params))
        self.run(1)  # compile

    def run(self, steps: int) -> float:
        self.state, seconds = timed_steps(lambda state: self.trainer.train_step(state, self.batch), self.state, steps)
        return seconds


class Torch:
    def __init__(self, vocab, d_model, heads, d_ff, layers, batch, length, dropout, dtype="float32"):
        import torch  # noqa: PLC0415
        from torch import nn  # noqa: PLC0415

        torch.manual_seed(0)
        self.torch, self.vocab, self.d_model = torch, vocab, d_model
        self.autocast = dtype != "float32"
        self.dtype = getattr(torch, dtype)
        self.embedding = nn.Embedding(vocab, d_model)
        nn.init.normal_(self.embedding.weight, std=d_model**-0.5)
        self.model = nn.Transformer(d_model, heads, layers, layers, d_ff, dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        position = torch.arange(length)[:, None]
        scale = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        self.positions = torch.zeros(length, d_model)
        self.positions[:, 0::2], self.positions[:, 1::2] = torch.sin(position * scale), torch.cos(position * scale)
        self.causal = nn.Transformer.generate_square_subsequent_mask(length)
        modules = nn.ModuleList([self.embedding, self.model])
        self.parameters = list(modules.parameters())
        self.params = sum(p.numel() for p in self.parameters)
        self.optimizer = torch.optim.Adam(self.parameters, lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
        rng = np.random.default_rng(0)
        self.inputs, self.targets = (torch.from_numpy(rng.integers(2, vocab, size=(batch, length)).astype(np.int64))
                                     for _ in range(2))
        self.decoder_inputs = torch.nn.functional.pad(self.targets, (1, 0))[:, :-1]
        modules.train()
        self.run(1)

    def _embed(self, ids):
        return self.dropout(self.embedding(ids) * math.sqrt(self.d_model) + self.positions)

    def run(self, steps: int) -> float:
        torch = self.torch
        start = time.perf_counter()
        for _ in range(steps):
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=self.dtype, enabled=self.autocast):
                hidden = self.model(self._embed(self.inputs), self._embed(self.decoder_inputs), tgt_mask=self.causal,
                                    tgt_is_causal=True)
                logits = hidden @ self.embedding.weight.T
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, self.vocab), self.targets.reshape(-1),
                                                     label_smoothing=0.1)
            loss.backward()
            self.optimizer.step()
        return (time.perf_counter() - start) / steps


class FlaxWMT:
    """The Flax WMT example's `models.Transformer` (pre-norm, shared embedding, logits via the
    embedding) imported from a flax checkout, trained by a step written here after its train.py:
    a soft one-hot label-smoothed loss and argmax accuracy from the whole logits, Adam, dropout."""

    def __init__(self, vocab, d_model, heads, d_ff, layers, batch, length, dropout, dtype="float32"):
        import importlib.util  # noqa: PLC0415

        import optax  # noqa: PLC0415

        spec = importlib.util.spec_from_file_location("flax_wmt_models", f"{_FLAX_WMT.value}/models.py")
        models = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(models)
        config = models.TransformerConfig(
            vocab_size=vocab, output_vocab_size=vocab, share_embeddings=True, logits_via_embedding=True,
            dtype=jnp.dtype(dtype), emb_dim=d_model, num_heads=heads, num_layers=layers, qkv_dim=d_model, mlp_dim=d_ff,
            max_len=max(512, length), dropout_rate=dropout, attention_dropout_rate=0.0, deterministic=False)
        model = models.Transformer(config)
        rng = np.random.default_rng(0)
        inputs, targets = (jnp.asarray(rng.integers(2, vocab, size=(batch, length)), jnp.int32) for _ in range(2))
        params = jax.jit(models.Transformer(config.replace(deterministic=True)).init)(
            jax.random.PRNGKey(0), inputs, targets)["params"]
        tx = optax.adam(1e-4, b1=0.9, b2=0.98, eps=1e-9)
        confidence, low = 0.9, 0.1 / (vocab - 1)
        constant = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low))

        def step(state, inputs, targets):
            params, opt_state, index = state

            def loss_fn(params):
                logits = model.apply({"params": params}, inputs, targets,
                                     rngs={"dropout": jax.random.fold_in(jax.random.PRNGKey(1), index)})
                soft = jax.nn.one_hot(targets, vocab) * (confidence - low) + low
                loss = -jnp.sum(soft * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1) - constant
                weights = (targets > 0).astype(jnp.float32)
                return jnp.sum(loss * weights) / jnp.sum(weights), logits

            (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            accuracy = jnp.mean(jnp.argmax(logits, -1) == targets)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, index + 1), (loss, accuracy)

        self.step = jax.jit(step, donate_argnums=(0,))
        self.state = (params, tx.init(params), jnp.zeros((), jnp.int32))
        self.inputs, self.targets = inputs, targets
        self.params = sum(x.size for x in jax.tree.leaves(params))
        self.run(1)

    def run(self, steps: int) -> float:
        self.state, seconds = timed_steps(lambda state: self.step(state, self.inputs, self.targets), self.state, steps)
        return seconds


def peer_sides(peers: dict, dtypes: list[str]) -> dict[str, tuple[str, type, str]]:
    """{side name: (peer, runner class, dtype)}: each peer in each of `dtypes`, named by the peer
    alone when there is one dtype, else "PEER DTYPE"."""
    return {(peer if len(dtypes) == 1 else f"{peer} {dtype}"): (peer, cls, dtype)
            for peer, cls in peers.items() for dtype in dtypes}


def main(argv):
    del argv
    import torch  # noqa: PLC0415

    unknown = sorted(set(_SHAPES.value) - set(SHAPES))
    if unknown:
        raise cli.UserError(f"--shapes: unknown {unknown}; choose from {', '.join(SHAPES)}.")
    peer_dtypes = list(dict.fromkeys(_PEER_DTYPES.value or [_DTYPE.value]))
    if set(peer_dtypes) - {"float32", "bfloat16"}:
        raise cli.UserError(f"--peer_dtypes: {peer_dtypes}; choose from float32, bfloat16.")
    runtime.use_prng_impl(_PRNG.value)
    dtypes = list(dict.fromkeys([_DTYPE.value, *peer_dtypes]))

    def peak(dtype):
        return matmul_gflops(dtype, n=_PEAK_SIZE.value, rounds=_PEAK_ROUNDS.value)

    first = {dtype: peak(dtype) for dtype in dtypes}
    peaks = {dtype: [max(rates)] for dtype, rates in first.items()}
    print(f"{time.strftime('%Y-%m-%d')}: JAX {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {jax.devices()[0].device_kind}, our PRNG "
          f"{jax.config.jax_default_prng_impl}; ours in {_DTYPE.value}, the peers in {', '.join(peer_dtypes)}; matmul "
          "peak: " + "; ".join(f"{dtype} JAX {j:.0f}, torch {t:.0f} GFLOP/s" for dtype, (j, t) in first.items())
          + " (measured again after each shape); freed host memory kept (all sides): "
          f"{'yes' if runtime.host_memory_kept() else 'no'}")
    peers = {"torch": Torch} | ({"flax_wmt": FlaxWMT} if _FLAX_WMT.value else {})
    sides = peer_sides(peers, peer_dtypes)
    of_peer = {peer: [side for side, (p, _, _) in sides.items() if p == peer] for peer in peers}
    side_dtype = {"ours": _DTYPE.value} | {side: dtype for side, (_, _, dtype) in sides.items()}
    header = ["shape", "params ours / " + " / ".join(peers), "ours tok/s"]
    for side in sides:
        header += [f"{side} tok/s", f"ours / {side}"]
    if len(peer_dtypes) > 1:
        header += [f"ours / {peer} best" for peer in peers]
    header += ["ours GFLOP/s (of peak)"] + [f"{side} GFLOP/s (of peak)" for side in sides]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    notes = []
    for name in _SHAPES.value:
        vocab, d_model, heads, d_ff, layers, batch, length, dropout = shape = SHAPES[name]
        runners = {"ours": Ours(*shape, dtype=_DTYPE.value, loss_block_tokens=_LOSS_BLOCK.value)}
        runners.update({side: cls(*shape, dtype=dtype) for side, (_, cls, dtype) in sides.items()})
        times = {side: [] for side in runners}
        order, faults = list(runners), dict.fromkeys(runners, 0)
        for r in range(-_WARMUP.value, _ROUNDS.value):  # each round starts one side later than the one before
            for side in order[r % len(order):] + order[:r % len(order)]:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                seconds = runners[side].run(_STEPS.value)
                if r >= 0:
                    times[side].append(seconds)
                    faults[side] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        notes.append(f"{name}: page faults in the timed rounds, "
                     + ", ".join(f"{side} {n:,}" for side, n in faults.items()))
        step = {side: statistics.median(t) for side, t in times.items()}
        for dtype in dtypes:  # again after each shape
            peaks[dtype].append(max(peak(dtype)))
        tokens = batch * length
        flops = tokens * metrics.flops_per_token(
            d_model=d_model, d_ff=d_ff, num_heads=heads, num_encoder_layers=layers, num_decoder_layers=layers,
            vocab_size=vocab, source_length=length, target_length=length)
        rate = {side: flops / s / 1e9 for side, s in step.items()}
        params = [runners["ours"].params] + [runners[of_peer[peer][0]].params for peer in peers]
        row = [f"{name} ({vocab}, {d_model}, {heads}, {d_ff}, {layers}+{layers}, {batch}x{length})",
               " / ".join(f"{n / 1e6:.2f}M" for n in params), f"{tokens / step['ours']:,.0f}"]
        for side in sides:
            row += [f"{tokens / step[side]:,.0f}", f"**{step[side] / step['ours']:.2f}x**"]
        if len(peer_dtypes) > 1:
            row += [f"**{min(step[side] for side in of_peer[peer]) / step['ours']:.2f}x**" for peer in peers]
        row += [f"{rate[side]:.0f} ({rate[side] / max(peaks[side_dtype[side]]):.0%})" for side in runners]
        print("| " + " | ".join(row) + " |", flush=True)
    print("\n".join(notes))
    for dtype in dtypes:
        print(f"{dtype} matmul peak, measured before the first shape and after each: "
              + ", ".join(f"{p:.0f}" for p in peaks[dtype]) + " GFLOP/s; each row's fraction is of the highest "
              "up to its end in the side's dtype.")


if __name__ == "__main__":
    cli.run(main)
