"""Where a train step's time goes, op by op: a `jax.profiler` trace of our step, summed by kind of op.

    python -m experiments.benchmarks.profile_step --shape=base_32k --dtype=float32
    python -m experiments.benchmarks.profile_step --shape=multi30k --steps=5 --top=25

Traces `--steps` calls of `Trainer.train_step` as shipped for CPU (one of compare.py's shapes, a packed
batch of `step_parts.packed_rows`, after two warm-up calls), reads the trace back
(`jax.profiler.ProfileData`) and gives every XLA op the CPU runtime ran (the events that carry an
`hlo_op`) a kind, from the ops inside it in the step's compiled HLO:
  * products:    a dot or a convolution (alone, or in the fusion XLA hands to YNNPACK with its
                 neighbours);
  * reductions:  a reduce (LayerNorm statistics, softmax sums, the loss, bias gradients);
  * copies:      data movement only: copy, transpose, slice, concatenate, pad, broadcast, ...;
  * elementwise: any other fusion (dropout masks, activations, residual adds, Adam);
  * other:       custom calls, sorts, random bits, ...
Loops and calls (`while`, `conditional`, `call`) hold other ops, whose events count instead.

Printed: the step's wall time; the op time each runtime thread recorded (the ops' event durations:
XLA runs independent ops side by side, so the sum can pass the wall time, and it is not CPU time);
op time by kind, as a share of all op time; op time by part of the model (layer norms, attention
projections, the rest of attention, feed-forward, ..., forward and backward apart; from the module
path in each op's `op_name` metadata, `PARTS`) and kind; and the `--top` ops by time a step.
Tracing slows the step (1.6x at base_32k in float32 on a 2-core Xeon, 2026-12-06); the untraced
median printed beside it says by how much, so read the shares rather than the times. Beside
`experiments.benchmarks.products` (each product alone against torch's), this says what the rest of
the step costs. CPU only: it reads the events of XLA's CPU runtime.
"""

import collections
import dataclasses
import glob
import os
import re
import statistics
import tempfile
import time

import jax
from absl import flags

from experiments import cli
from experiments.benchmarks import compare, step_parts
from experiments.benchmarks.compare import SHAPES
from transformer import plan

_TOP = flags.DEFINE_integer("top", 15, "How many of the costliest ops to list.", lower_bound=0)
_TRACE_DIR = flags.DEFINE_string("trace_dir", None, "Keep the trace here (TensorBoard / XProf can open it); "
                                 "default: a temporary directory, removed afterwards.")
# --shape is step_parts.py's flag, --dtype and --steps (the traced steps) compare.py's.
_SHAPE, _DTYPE, _TRACED = step_parts._SHAPE, compare._DTYPE, compare._STEPS

KINDS = ("products", "reductions", "copies", "elementwise", "other")
_PRODUCT_OPS = {"dot", "convolution"}
_REDUCE_OPS = {"reduce", "reduce-window"}
_MOVE_OPS = {"copy", "transpose", "bitcast", "reshape", "slice", "dynamic-slice", "dynamic-update-slice",
             "concatenate", "pad", "broadcast", "tuple", "get-tuple-element", "reverse", "iota", "gather",
             "copy-start", "copy-done"}
_HOLDER_OPS = {"parameter", "constant"}
_CONTAINER_OPS = {"while", "conditional", "call", "async-start", "async-done", "async-update"}
_WRAPPER_OPS = {"fusion"}  # a fusion's own opcode says nothing; its body decides
_OTHER_OPS = {"custom-call", "sort", "rng", "rng-bit-generator", "scatter", "infeed", "outfeed", "send", "recv",
              "all-reduce", "all-gather", "all-to-all", "collective-permute"}
# The part of the model an op belongs to, from the module path in its op_name; first match wins
# (a layer norm sits inside its sublayer's path, the projections inside the attention's).
PARTS = (("layer norms", ("_norm/", "/norm/", "layer_norm")),
         ("attention projections", ("._project/",)),
         ("attention: scores, softmax, weighted sum", ("attention",)),
         ("feed-forward", ("feed_forward", "/mlp")),
         ("dropout masks", ("dropout",)),
         ("embeddings", ("embed",)),
         ("loops outside the model (the fused loss, its gradients included)", ("/while/body/",)))
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition)=%?([\w.\-]+)|branch_computations=\{([^}]*)\}")


@dataclasses.dataclass(frozen=True)
class Instruction:
    opcode: str
    type: str  # the result type as printed, e.g. "f32[2048,512]{1,0}"
    called: tuple[str, ...]  # computations it calls (fusion bodies, reduction regions, loop bodies)
    op_name: str = ""  # its metadata's op_name: the JAX call path, modules included, that made it


def parse_hlo(hlo_text: str) -> tuple[dict[str, Instruction], dict[str, list[str]]]:
    """Every instruction of a module's HLO text, by name, and each computation's instruction names."""
    instructions, computations = {}, {}
    for computation, lines in plan.hlo_computations(hlo_text).items():
        names = computations[computation] = []
        for match in filter(None, map(plan.HLO_INSTRUCTION.match, lines)):
            name, type_, opcode, rest = match.groups()
            called = []
            for single, several in _CALLS.findall(rest):
                called += [single] if single else [c.strip().lstrip("%") for c in several.split(",") if c.strip()]
            op_name = plan.HLO_OP_NAME.search(rest)
            instructions[name] = Instruction(opcode, type_, tuple(called), op_name.group(1) if op_name else "")
            names.append(name)
    return instructions, computations


def op_kinds(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> one of KINDS (or "container") for every instruction in `hlo_text`."""
    return kinds_of(*parse_hlo(hlo_text))


def kinds_of(instructions: dict[str, Instruction], computations: dict[str, list[str]]) -> dict[str, str]:
    """`op_kinds` of a module `parse_hlo` has read."""
    memo: dict[str, frozenset] = {}

    def opcodes(computation: str) -> frozenset:  # every opcode inside, through fusions and regions
        if computation not in memo:
            found = set()
            for name in computations.get(computation, ()):
                found |= inner(instructions[name])
            memo[computation] = frozenset(found)
        return memo[computation]

    def inner(ins: Instruction) -> set:
        found = {ins.opcode}
        if ins.opcode not in _CONTAINER_OPS:
            for c in ins.called:
                found |= opcodes(c)
        return found

    kinds = {}
    for name, ins in instructions.items():
        if ins.opcode in _CONTAINER_OPS:
            kinds[name] = "container"
            continue
        ops = inner(ins) - _HOLDER_OPS - _WRAPPER_OPS
        if ops & _PRODUCT_OPS:
            kinds[name] = "products"
        elif ops & _REDUCE_OPS:
            kinds[name] = "reductions"
        elif ops <= _MOVE_OPS:
            kinds[name] = "copies"
        elif ops & _OTHER_OPS:
            kinds[name] = "other"
        else:
            kinds[name] = "elementwise"
    return kinds


@dataclasses.dataclass
class OpTimes:
    wall_seconds: float  # per step
    by_op: dict[str, float]  # hlo op name -> seconds per step (op time, summed over threads)
    by_thread: dict[str, float]  # runtime thread -> op seconds per step
    calls: dict[str, float]  # hlo op name -> executions per step


def trace_op_times(fn, steps: int, trace_dir: str, module_prefix: str = "jit_") -> OpTimes:
    """Run `fn()` (returns something to wait on) `steps` times under `jax.profiler.trace` and sum the
    recorded XLA op events (those with an `hlo_op` stat, from modules named `module_prefix`...)."""
    with jax.profiler.trace(trace_dir):
        start = time.perf_counter()
        for _ in range(steps):
            out = fn()
        jax.block_until_ready(out)
        wall = time.perf_counter() - start
    path = max(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    profile = jax.profiler.ProfileData.from_file(path)
    by_op, by_thread, calls = collections.Counter(), collections.Counter(), collections.Counter()
    for plane in profile.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                op, module = stats.get("hlo_op"), str(stats.get("hlo_module", ""))
                if op is None or not module.startswith(module_prefix):
                    continue
                by_op[op] += event.duration_ns / 1e9 / steps
                by_thread[line.name] += event.duration_ns / 1e9 / steps
                calls[op] += 1 / steps
    return OpTimes(wall / steps, dict(by_op), dict(by_thread), dict(calls))


def by_kind(times: OpTimes, kinds: dict[str, str]) -> dict[str, float]:
    """Seconds per step of each of KINDS (containers left out: their inner ops count)."""
    out = dict.fromkeys(KINDS, 0.0)
    for op, seconds in times.by_op.items():
        kind = kinds.get(op, "other")
        if kind != "container":
            out[kind] += seconds
    return out


def part_of(op_name: str) -> str:
    """The part of the model (one of PARTS' names) an op_name belongs to, after "forward: " or
    "backward: " (`plan.is_backward`). PARTS' last entry, the fused loss's loop, has no such prefix
    (it makes its gradients inside its forward pass); ops outside every part are "the rest: ...",
    ops without an op_name "unnamed"."""
    if not op_name:
        return "unnamed"
    part = next((name for name, marks in PARTS if any(m in op_name for m in marks)), None)
    if part is None:
        return "the rest: optimizer, loss outside loops, casts"
    if part == PARTS[-1][0]:
        return part
    return ("backward: " if plan.is_backward(op_name) else "forward: ") + part


def by_part(times: OpTimes, kinds: dict[str, str], instructions: dict[str, Instruction]) -> dict[str, dict[str, float]]:
    """Seconds per step by `part_of` and then by kind (containers left out)."""
    out = collections.defaultdict(lambda: dict.fromkeys(KINDS, 0.0))
    for op, seconds in times.by_op.items():
        kind = kinds.get(op, "other")
        if kind != "container":
            ins = instructions.get(op)
            out[part_of(ins.op_name if ins else "")][kind] += seconds
    return dict(out)


def report(times: OpTimes, kinds: dict[str, str], instructions: dict[str, Instruction], top: int) -> str:
    kind_seconds = by_kind(times, kinds)
    total = sum(kind_seconds.values())
    lines = [f"step wall time {times.wall_seconds * 1e3:,.1f} ms; op time {total * 1e3:,.1f} ms "
             f"({total / times.wall_seconds:.0%} of the wall time) over {len(times.by_thread)} runtime threads: "
             + ", ".join(f"{s * 1e3:,.0f}" for s in sorted(times.by_thread.values(), reverse=True)) + " ms",
             "", "| kind | ms a step | of op time |", "| --- | --- | --- |"]
    lines += [f"| {k} | {s * 1e3:,.1f} | {s / total:.1%} |" for k, s in kind_seconds.items()]
    unknown = sorted(set(times.by_op) - set(kinds))
    if unknown:  # the trace and the HLO should name the same ops; say so where they do not
        lines.insert(1, f"{len(unknown)} traced ops not in the compiled HLO (counted as other): "
                        + ", ".join(unknown[:5]))
    parts = sorted(by_part(times, kinds, instructions).items(), key=lambda item: -sum(item[1].values()))
    lines += ["", "| part of the model | ms a step | of op time | " + " | ".join(KINDS) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in KINDS) + " |"]
    lines += [f"| {part} | {sum(k.values()) * 1e3:,.1f} | {sum(k.values()) / total:.1%} | "
              + " | ".join(f"{k[kind] * 1e3:,.1f}" for kind in KINDS) + " |" for part, k in parts]
    if top:
        lines += ["", "| op | kind | result | runs a step | ms a step | of op time |",
                  "| --- | --- | --- | --- | --- | --- |"]
        ranked = sorted(((s, op) for op, s in times.by_op.items() if kinds.get(op) != "container"), reverse=True)
        for seconds, op in ranked[:top]:
            ins = instructions.get(op)
            result = ins.type.split("{")[0] if ins else "?"
            lines.append(f"| {op} | {kinds.get(op, 'other')} | {result} | {times.calls[op]:g} | "
                         f"{seconds * 1e3:,.1f} | {seconds / total:.1%} |")
    return "\n".join(lines)


def main(argv):
    del argv
    shape, dtype = _SHAPE.value, _DTYPE.value
    trainer = step_parts.make_trainer(shape, dtype)
    batch = trainer.to_global(step_parts.packed_rows(shape))
    holder = {"state": trainer.init_state(0)}

    def step():
        holder["state"], out = trainer.train_step(holder["state"], batch)
        return out

    for _ in range(2):
        jax.block_until_ready(step())
    with trainer.context():
        hlo = trainer._train_step.lower(holder["state"], batch).compile().as_text()
    instructions, computations = parse_hlo(hlo)
    kinds = kinds_of(instructions, computations)
    untimed = [compare.timed(step, 1) for _ in range(_TRACED.value)]  # the trace's own cost, for the record
    with tempfile.TemporaryDirectory() as tmp:
        times = trace_op_times(step, _TRACED.value, _TRACE_DIR.value or tmp, module_prefix="jit_train_step")
    print(f"{shape} {SHAPES[shape][:7]}, {dtype}, JAX {jax.__version__}, {jax.devices()[0].device_kind}; "
          f"{_TRACED.value} traced steps; untraced {statistics.median(untimed) * 1e3:,.1f} ms a step (median)")
    print(report(times, kinds, instructions, _TOP.value))


if __name__ == "__main__":
    cli.run(main)
