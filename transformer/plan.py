"""Know before you launch: compile a run's programs for a TPU slice ahead of time and read the result.

`plan(config, slice)` builds the `Trainer` that `experiments.train` would build (its mesh laid over
the slice's devices, logical rules, donation, gradient accumulation, dtype, remat) and compiles,
with the real TPU compiler on any machine (`transformer.tpu`):

  * the train step on the largest batch the run will feed it;
  * the eval step;
  * translation runs: the beam-search decode at the config's decode batch and beam.

For each program it reads the compiler's own figures: per-chip memory (`memory_analysis`), FLOPs
and bytes accessed (`cost_analysis`), and the collectives in the compiled HLO. From those and the
chip's published peak figures it then *estimates* a roofline step time (compute, HBM traffic and
ICI traffic, perfectly overlapped: a lower bound), tokens/s, MFU and the time to `num_train_steps`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
import time

import jax
import jax.numpy as jnp

from transformer import decoding, evaluation, metrics, sharding, tokens, tpu, training
from transformer.run_config import TrainConfig, as_train_config

HEADROOM = 0.95  # a program "fits" when it needs at most this share of the chip's HBM (the runtime keeps some)
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
MAX_EXTRA_LENGTH = 50  # decoding: output length = input length + this (evaluation.Translator's default)


class PlanError(ValueError):
    """The run cannot be laid out on the slice (a batch that does not divide, an unknown topology)."""


# ---------------------------------------------------------------------------------------------
# Shapes the run feeds its programs.


@dataclasses.dataclass(frozen=True)
class BatchShape:
    rows: int
    length: int
    keys: tuple[str, ...]
    note: str = ""

    def specs(self, batch_sharding) -> dict:
        return {k: jax.ShapeDtypeStruct((self.rows, self.length), jnp.int32, sharding=batch_sharding)
                for k in self.keys}


def _keys(objective: str, packed: bool) -> tuple[str, ...]:
    sides = ("inputs", "targets") if objective == "translation" else ("targets",)
    extra = tuple(f"{s}_{k}" for s in sides for k in ("segment_ids", "positions")) if packed else ()
    return sides + extra


def train_batch_shape(run: TrainConfig, devices_per_host: int) -> BatchShape:
    """The largest batch the run trains on: for token-budget buckets, the longest bucket."""
    d = run.data
    if d.synthetic or d.batching in ("pad", "pack"):
        return BatchShape(d.batch_size, d.max_length, _keys(run.objective, d.batching == "pack"))
    from transformer.data import batching  # noqa: PLC0415 -- grain only when bucketing

    length = max(batching.bucket_boundaries(d.max_length))
    row_multiple = max(8, devices_per_host)  # as transformer.inputs buckets
    rows = batching.bucket_rows(length, d.tokens_per_batch, row_multiple)
    return BatchShape(rows, length, _keys(run.objective, False),
                      f"bucketed by tokens: the longest bucket, {rows} x {length} of {d.tokens_per_batch} tokens")


def eval_batch_shape(run: TrainConfig) -> BatchShape:
    return BatchShape(run.data.eval_batch_size, run.data.max_length, _keys(run.objective, False))


# ---------------------------------------------------------------------------------------------
# What the compiled HLO says.


# A line of HLO text: an instruction (name, result type, opcode, the rest of the line) or the header of
# a computation (its name). experiments.benchmarks.profile_step reads instructions, op names and
# hlo_computations.
HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
HLO_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{\s*$")
HLO_OP_NAME = re.compile(r'op_name="([^"]*)"')  # an instruction's metadata: the JAX call path that made it
_ARRAY = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f8e\w+|bf16|f16|f32|f64|c64|c128)\[([0-9,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "bf16": 16, "f16": 16, "s32": 32,
         "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64, "c64": 64, "c128": 128}


def _arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of every array in an HLO shape (tuples included); layouts are ignored."""
    text = re.sub(r"\{[^{}]*\}", "", shape_text)  # drop layouts such as {1,0:T(8,128)}
    return [(t, tuple(int(x) for x in dims.split(",") if x)) for t, dims in _ARRAY.findall(text)]


def _bytes(arrays) -> int:
    return sum(math.prod(dims) * _BITS.get(t if not t.startswith("f8") else "s8", 32) // 8 for t, dims in arrays)


@dataclasses.dataclass
class Collective:
    count: int = 0
    bytes: int = 0  # per chip, summed over the instructions (their results)
    ici_bytes: float = 0.0  # bytes each chip sends for them, by the usual ring algorithms


def _group_size(line: str, default: int) -> int:
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if iota:
        return int(iota.group(2))
    listed = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
    if listed:
        return len(listed.group(1).split(","))
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?: \{([^}]*)\})?", line)
    if mesh:  # mesh['axis_0'=2,'axis_1'=4] {'axis_1'}: a group spans the axes in braces (all if none)
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
        axes = re.findall(r"'([^']+)'", mesh.group(2)) if mesh.group(2) else list(sizes)
        return math.prod(int(sizes[a]) for a in axes if a in sizes) or default
    return default


def _ici_bytes(kind: str, result_bytes: int, n: int) -> float:
    if n <= 1:
        return 0.0
    if kind == "all-reduce":
        return 2.0 * result_bytes * (n - 1) / n
    if kind == "reduce-scatter":  # the result is one shard of the reduced array
        return float(result_bytes * (n - 1))
    if kind == "collective-permute":
        return float(result_bytes)
    return result_bytes * (n - 1) / n  # all-gather, all-to-all


@dataclasses.dataclass
class HloSummary:
    collectives: dict[str, Collective]
    traffic_bytes: float  # operand + result bytes of the unfused instructions, loops counted by trip count
    largest: list[tuple[float, str]]  # the biggest contributors: (bytes, source op in the model)
    vocab_bytes: float  # of traffic_bytes: instructions whose arrays have a vocabulary-sized dimension
    pallas_kernels: int = 0  # Mosaic (Pallas TPU) kernel calls, e.g. splash attention


def is_backward(op_name: str) -> bool:
    """Whether an op_name is of the gradient's ops: JAX names them `transpose(jvp(...))`."""
    return "transpose(" in op_name


def _source(line: str, opcode: str) -> str:
    """Where an instruction comes from, from its metadata: "decoder/layer_*/feed_forward (backward)"."""
    if 'custom_call_target="tpu_custom_call"' in line:
        return "Pallas kernels (splash attention)"
    name = HLO_OP_NAME.search(line)
    if not name:
        return "asynchronous copies" if opcode.endswith("-done") else opcode
    path = re.sub(r"layer_\d+", "layer_*", name.group(1))
    backward = is_backward(path)
    path = re.sub(r"\b(?:jit|jvp|transpose|checkpoint|remat)\(|\)", "", path)
    parts = [p for p in path.split("/") if p and p not in ("train_step", "eval_step", "translate")]
    return "/".join(parts[-4:]) + (" (backward)" if backward else "")


def hlo_computations(text: str) -> dict[str, list[str]]:
    """Each computation of a module's HLO text, by name: its lines, header and closing brace left out."""
    computations: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        header = HLO_COMPUTATION.match(line)
        if header and "=" not in line.split("(")[0]:
            current = header.group(1)
            computations[current] = []
        elif current is not None and line.strip() and line.strip() != "}":
            computations[current].append(line)
    return computations


def summarise_hlo(text: str, *, num_devices: int, vocab_sizes: tuple[int, ...] = ()) -> HloSummary:
    """Collectives and a rough account of HBM traffic from compiled (post-optimisation) HLO text.

    TPU fuses a reduce-scatter into a fusion computation named all-reduce-scatter*: such a fusion
    counts as one reduce-scatter, not as the all-reduce inside it.
    """
    computations = hlo_computations(text)

    shapes, multiplier = {}, collections.Counter()
    for name, lines in computations.items():
        for line in lines:
            m = HLO_INSTRUCTION.match(line)
            if m:
                shapes[m.group(1)] = _arrays(m.group(2))
    entry = next((n for n in computations if re.search(rf"^ENTRY %{re.escape(n)}\b", text, re.M)), None)
    # Loop bodies run trip-count times; everything else reached by a call runs once per caller run.
    multiplier[entry] = 1
    for _ in range(8):  # nesting depth
        for name, lines in computations.items():
            if not multiplier[name]:
                continue
            for line in lines:
                m = HLO_INSTRUCTION.match(line)
                if not m or m.group(3) not in ("while", "call", "conditional"):
                    continue
                trips = re.search(r"known_trip_count\W+n\W+(\d+)", line)
                times = int(trips.group(1)) if (m.group(3) == "while" and trips) else 1
                for callee in re.findall(r"(?:body|condition|to_apply|branch_computations=\{[^}]*)=?%([\w.-]+)", line):
                    multiplier[callee] = max(multiplier[callee], multiplier[name] * times)

    collectives = {k: Collective() for k in COLLECTIVES}
    reduce_scatter_bodies = {n for n in computations if n.startswith("all-reduce-scatter")}
    traffic, vocab, sources = 0.0, 0.0, collections.Counter()
    vocab_dims = set(v for v in vocab_sizes if v > 1)
    for name, lines in computations.items():
        if name in reduce_scatter_bodies:
            continue
        times = multiplier[name] or 1
        top_level = bool(multiplier[name])
        for line in lines:
            m = HLO_INSTRUCTION.match(line)
            if not m:
                continue
            op, result = m.group(3).removesuffix("-start"), shapes.get(m.group(1), [])
            kind, group_line = None, line
            if op in COLLECTIVES:
                kind = op
            elif op == "fusion" and re.search(r"calls=%all-reduce-scatter", line):
                kind = "reduce-scatter"  # its replica groups are on the all-reduce inside
                callee = re.search(r"calls=%([\w.-]+)", line).group(1)
                group_line = next((x for x in computations.get(callee, []) if "replica_groups=" in x), line)
            if kind:
                c = collectives[kind]
                c.count += 1
                c.bytes += _bytes(result)
                c.ici_bytes += times * _ici_bytes(kind, _bytes(result), _group_size(group_line, num_devices))
            if not top_level or op in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
                                       "call", "conditional") or m.group(3).endswith("-start"):
                continue
            if 'custom_call_target="ConcatBitcast"' in line:  # a reinterpretation, no data moves
                continue
            if m.group(3).endswith("-done"):  # an asynchronous move: its result is what moved
                arrays = result
            else:
                operands = [shapes.get(o, []) for o in re.findall(r"%([\w.-]+)", m.group(4).split("), ")[0])]
                arrays = result + [a for o in operands for a in o]
            moved = times * _bytes(arrays)
            traffic += moved
            if any(d in vocab_dims for _, dims in arrays for d in dims):
                vocab += moved
            sources[_source(line, m.group(3))] += moved
    largest = sorted(((b, s) for s, b in sources.items()), reverse=True)
    kernels = len(re.findall(r'custom_call_target="tpu_custom_call"', text))
    return HloSummary(collectives, traffic, largest[:5], vocab, kernels)


# ---------------------------------------------------------------------------------------------
# Compiling.


@dataclasses.dataclass
class Program:
    name: str
    compile_seconds: float
    state_bytes: int  # per chip: parameters (+ optimizer state for training) among the arguments
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float  # per chip, per call
    bytes_accessed: float
    hlo: HloSummary
    out_of_memory: str | None = None  # the compiler's refusal, when the program cannot fit

    @property
    def total_bytes(self) -> int:
        """Peak per-chip HBM: arguments, outputs not aliased to (donated) arguments, temporaries, code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


def _per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a tree of sharded ShapeDtypeStructs."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(tree))


def _compile(name: str, jitted, args, state, trainer, vocab_sizes) -> Program:
    start = time.perf_counter()
    with trainer.context():
        lowered = jitted.lower(*args)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            message = str(e).strip().splitlines()[0].replace("RESOURCE_EXHAUSTED: ", "")
            empty = HloSummary({k: Collective() for k in COLLECTIVES}, 0.0, [], 0.0)
            return Program(name, time.perf_counter() - start, _per_chip_bytes(state), 0, 0, 0, 0, 0, 0.0, 0.0, empty,
                           out_of_memory=message)
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hlo = summarise_hlo(compiled.as_text(), num_devices=trainer.mesh.size, vocab_sizes=vocab_sizes)
    return Program(name, seconds, _per_chip_bytes(state), memory.argument_size_in_bytes,
                   memory.output_size_in_bytes, memory.alias_size_in_bytes, memory.temp_size_in_bytes,
                   memory.generated_code_size_in_bytes, float(cost.get("flops", 0.0)),
                   float(cost.get("bytes accessed", 0.0)), hlo)


def _check_rows(what: str, rows: int, shards: int, grad_accum: int = 1):
    if rows % (shards * grad_accum):
        accum = f" x {grad_accum} gradient-accumulation micro-batches" if grad_accum > 1 else ""
        raise PlanError(f"{what} has {rows} rows, which do not split over the {shards} batch shards of the mesh"
                        f"{accum}: choose a multiple of {shards * grad_accum}.")


@dataclasses.dataclass
class Plan:
    slice: tpu.Slice
    run: TrainConfig
    mesh_shape: dict
    train_batch: BatchShape
    programs: list[Program]
    model_flops_per_step: float  # analytic matmul FLOPs of one training step, all chips
    tokens_per_step: int  # target tokens

    def fits(self, program: Program) -> bool:
        return program.out_of_memory is None and program.total_bytes <= HEADROOM * self.slice.chip.hbm_bytes

    @property
    def all_fit(self) -> bool:
        return all(self.fits(p) for p in self.programs)

    def roofline(self, program: Program) -> dict:
        chip = self.slice.chip
        parts = dict(compute=program.flops / chip.peak_bf16_flops, hbm=program.bytes_accessed / chip.hbm_bytes_per_s,
                     ici=sum(c.ici_bytes for c in program.hlo.collectives.values()) / chip.ici_bytes_per_s)
        bound = max(parts, key=parts.get)
        return dict(parts, step=parts[bound], bound=bound)

    def estimate(self, overlap: bool = True) -> dict:
        """Roofline estimates for training. `overlap`: compute, HBM and ICI traffic overlap perfectly
        (step = the largest; a lower bound on step time); else not at all (step = their sum)."""
        r = self.roofline(self.programs[0])
        step = r["step"] if overlap else r["compute"] + r["hbm"] + r["ici"]
        chips = self.slice.num_chips
        steps = self.run.num_train_steps
        return dict(step_seconds=step, tokens_per_second=self.tokens_per_step / step,
                    mfu=self.model_flops_per_step / (step * chips * self.slice.chip.peak_bf16_flops),
                    hours=step * steps / 3600, chip_hours=step * steps * chips / 3600)


def plan(config, slice_: tpu.Slice, *, devices=None, programs=("train", "eval", "decode"), log=print) -> Plan:
    """Compiles `config`'s programs for `slice_` (devices: the slice's, from libtpu, unless given)."""
    run = as_train_config(config)
    devices = tpu.topology_devices(slice_) if devices is None else devices
    try:
        mesh = sharding.make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor, devices=devices)
    except ValueError as e:
        raise PlanError(f"config.mesh does not fit {slice_}: {e}") from e
    model_cfg = run.model_config()
    trainer = training.Trainer(run, model_cfg, mesh)
    shards = evaluation.batch_shards(trainer.batch_sharding)
    devices_per_host = max(1, slice_.num_chips // slice_.num_hosts)
    if slice_.num_hosts > 1 and not run.data.synthetic and run.data.batching == "bucket":
        raise PlanError(f"config.data.batching='bucket' is single-host only and {slice_} has {slice_.num_hosts} "
                        "hosts: training would refuse it. Use --config.data.batching=pack with "
                        "--config.data.batch_size=ROWS (fixed shapes on every host).")
    train_batch = train_batch_shape(run, devices_per_host)
    _check_rows("the training batch", train_batch.rows, shards, run.optimizer.grad_accum_steps)
    vocab_sizes = ()
    if model_cfg.vocab_size >= 1024:  # small vocabularies share sizes with other dimensions
        vocab_sizes = (model_cfg.vocab_size,) + tuple(
            model_cfg.vocab_size // n for n in (mesh.shape["tensor"], mesh.shape["fsdp"]) if n > 1)
    state = trainer.abstract_state
    compiled = []
    if "train" in programs:
        log(f"Compiling the train step for {slice_} ...")
        compiled.append(_compile("train step", trainer._train_step, (state, train_batch.specs(trainer.batch_sharding)),
                                 state, trainer, vocab_sizes))
    if "eval" in programs:
        eval_batch = eval_batch_shape(run)
        _check_rows("config.data.eval_batch_size", eval_batch.rows, shards)
        log("Compiling the eval step ...")
        compiled.append(_compile("eval step", trainer._eval_step,
                                 (state.params, eval_batch.specs(trainer.batch_sharding)), state.params, trainer,
                                 vocab_sizes))
    if "decode" in programs and run.decode is not None:
        rows = -(-run.decode.batch_size // shards) * shards  # as evaluation.Translator rounds
        inputs = jax.ShapeDtypeStruct((rows, run.data.max_length), jnp.int32, sharding=trainer.batch_sharding)
        translate = jax.jit(functools.partial(
            decoding.translate, trainer.model, eos_id=tokens.EOS_ID, beam_size=run.decode.beam_size,
            alpha=run.decode.alpha, max_extra_length=MAX_EXTRA_LENGTH))
        log(f"Compiling the beam-search decode (beam {run.decode.beam_size}, {rows} sentences) ...")
        compiled.append(_compile(f"decode (beam {run.decode.beam_size}, {rows} x {run.data.max_length})", translate,
                                 (state.params, inputs), state.params, trainer, vocab_sizes))
    tokens_per_step = train_batch.rows * train_batch.length
    flops_per_token = metrics.model_flops_per_token(model_cfg, run.objective, train_batch.length)
    return Plan(slice_, run, dict(mesh.shape), train_batch, compiled, flops_per_token * tokens_per_step,
                tokens_per_step)


# ---------------------------------------------------------------------------------------------
# The report.


def _gib(n: float) -> str:
    return f"{n / tpu.GiB:.2f} GiB"


def duration(hours: float) -> str:
    return f"{hours * 60:.1f} min" if hours < 1 else f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def report(p: Plan) -> str:
    chip = p.slice.chip
    lines = [f"Plan for {p.slice}; chip {chip.device_kind}: {_gib(chip.hbm_bytes)} HBM, "
             f"{chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bytes_per_s / 1e9:.0f} GB/s HBM, "
             f"{chip.ici_bytes_per_s / 1e9:.0f} GB/s ICI.",
             f"Mesh {p.mesh_shape}; model dtype {p.run.model.resolved_dtype('tpu')}, remat {p.run.model.remat}, "
             f"gradient accumulation {p.run.optimizer.grad_accum_steps}.",
             f"Training batch: {p.train_batch.rows} x {p.train_batch.length} tokens, "
             f"{p.train_batch.rows // (p.mesh_shape['data'] * p.mesh_shape['fsdp'])} rows per batch shard"
             + (f" ({p.train_batch.note})" if p.train_batch.note else "") + "."]
    for prog in p.programs:
        if prog.out_of_memory:
            lines += ["", f"{prog.name}: DOES NOT FIT, the TPU compiler refused it: {prog.out_of_memory}",
                      f"  ({_gib(prog.state_bytes)} per chip of parameters"
                      f"{' and optimizer state' if 'train' in prog.name else ''})"]
            continue
        fits = "fits" if p.fits(prog) else "DOES NOT FIT"
        lines += ["", f"{prog.name} (compiled in {prog.compile_seconds:.1f} s), per chip:",
                  f"  memory: {_gib(prog.state_bytes)} parameters{' + optimizer state' if 'train' in prog.name else ''}"
                  f", {_gib(prog.argument_bytes)} arguments, {_gib(prog.temp_bytes)} temporaries, "
                  f"{_gib(prog.total_bytes)} total of {_gib(chip.hbm_bytes)} HBM "
                  f"({100 * prog.total_bytes / chip.hbm_bytes:.0f}%): {fits}",
                  f"  compiled: {prog.flops / 1e12:.3f} TFLOP, {prog.bytes_accessed / 1e9:.2f} GB accessed per call"
                  + (" (the decoding loop's body counted once: the encoder plus about one step)"
                     if prog.name.startswith("decode") else "")]
        present = {k: c for k, c in prog.hlo.collectives.items() if c.count}
        lines.append("  collectives: " + (", ".join(
            f"{c.count} {k} ({c.bytes / 2**20:.1f} MiB)" for k, c in present.items()) or "none"))
        if prog.hlo.pallas_kernels:
            lines.append(f"  Pallas TPU kernels (splash attention): {prog.hlo.pallas_kernels} calls")
        r = p.roofline(prog)
        lines.append(f"  roofline: compute {r['compute'] * 1e3:.2f} ms, HBM {r['hbm'] * 1e3:.2f} ms, "
                     f"ICI {r['ici'] * 1e3:.2f} ms -> {r['bound']}-bound")
        if r["bound"] == "hbm" and prog.hlo.vocab_bytes:  # a vocabulary large enough to tell apart
            share = prog.hlo.vocab_bytes / prog.hlo.traffic_bytes
            top = "; ".join(f"{what} {b / 1e9:.2f} GB" for b, what in prog.hlo.largest[:4])
            lines.append(f"  HBM traffic (from the HLO, ~{prog.hlo.traffic_bytes / 1e9:.0f} GB): "
                         f"{100 * share:.0f}% touches vocabulary-sized arrays (logits, softmax, loss, embedding); "
                         f"largest sources: {top}")
    if p.programs and p.programs[0].name == "train step" and p.all_fit:
        lines += ["", "ESTIMATE, not a measurement: a roofline from the compiler's counts and the chip's peak figures, "
                  f"analytic model FLOPs {p.model_flops_per_step / 1e12:.2f} TFLOP/step; tokens are padded batch "
                  "positions."]
        for overlap, how in ((True, "compute, HBM and ICI overlapped perfectly (fastest)"),
                             (False, "none of them overlapped")):
            e = p.estimate(overlap)
            lines.append(f"  {how}: train step {e['step_seconds'] * 1e3:.1f} ms, "
                         f"{e['tokens_per_second']:,.0f} target tokens/s, MFU {100 * e['mfu']:.0f}%; "
                         f"{p.run.num_train_steps:,} steps in {duration(e['hours'])}, "
                         f"{e['chip_hours']:,.0f} chip-hours on {p.slice.num_chips} chips")
    if not p.all_fit:
        lines += ["", not_fit_message(p)]
    return "\n".join(lines)


def not_fit_message(p: Plan) -> str:
    refused = [prog for prog in p.programs if prog.out_of_memory]
    if refused:
        need = f"{refused[0].name} does not fit on a {p.slice.chip.name} chip ({refused[0].out_of_memory})"
    else:
        worst = max(p.programs, key=lambda prog: prog.total_bytes)
        need = (f"{worst.name} needs {_gib(worst.total_bytes)} per chip but a {p.slice.chip.name} chip has "
                f"{_gib(p.slice.chip.hbm_bytes)} ({int(HEADROOM * 100)}% usable)")
    return (f"{need}. Levers: shard parameters and optimizer "
            "state with --config.mesh.fsdp=N; recompute activations with --config.model.remat=True; a smaller "
            "batch (--config.data.batch_size or --config.data.tokens_per_batch); or split it into micro-batches "
            "with --config.optimizer.grad_accum_steps=K.")
