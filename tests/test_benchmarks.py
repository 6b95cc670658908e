"""The benchmark scripts run and print their tables (their figures are read by people, not asserted)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_step_parts_prints_every_part():
    result = subprocess.run([sys.executable, "-m", "experiments.benchmarks.step_parts", "--dtype=bfloat16",
                             "--rounds=1", "--steps=1", "--accumulate=2"], cwd=REPO, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    parts = [row.split(" | ")[0].strip("| ") for row in rows[2:]]
    assert parts == ["step (donated)", "step, no donate", "grads only", "adam only", "host -> device",
                     "accumulate 2", "previous kernels", "previous dropout"]
    assert all(float(row.split(" | ")[1].replace(",", "")) > 0 for row in rows[2:])


def test_products_prints_each_product_of_the_step():
    # float32: torch's bfloat16 products are emulated on CPUs without bfloat16 instructions, and its
    # [2048]^3 square alone then takes minutes.
    result = subprocess.run([sys.executable, "-m", "experiments.benchmarks.products", "--shapes=multi30k",
                             "--dtype=float32", "--rounds=1", "--repeats=1"], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.strip("| ").split(" | ") for line in result.stdout.splitlines() if line.startswith("| multi30k")]
    assert [row[1] for row in rows] == ["projection", "ffn in", "ffn out", "vocab block", "weight grad", "square"]
    assert rows[3][2] == "`tk,kn->tn` [256, 128] [128, 8000]"  # the output projection's block at the vocabulary
    assert all(float(row[3].replace(",", "")) > 0 and float(row[4].replace(",", "")) > 0 for row in rows)


def test_product_rates_keep_two_significant_digits_below_ten():
    # In a process of its own: the benchmark modules define absl flags of the same names (`repeats`),
    # and another test imports one of them into this process.
    code = ("from experiments.benchmarks.products import rate; "
            "print(*[rate(g) for g in (1234.4, 56.4, 10.0, 9.96, 5.678, 0.0347)])")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["1,234", "56", "10", "10", "5.7", "0.035"]


def test_compare_peak_is_the_best_round_of_each_library():
    # A clock that makes round 1 slow for JAX and round 2 slow for torch: each library's best round
    # (1 s of 2 x 2 * 64^3 FLOPs) must count, not its first or last.
    code = ("import types; from experiments.benchmarks import compare; "
            "ticks = iter([0, 3, 3, 4, 4, 5, 5, 9]); "
            "compare.time = types.SimpleNamespace(perf_counter=lambda: next(ticks)); "
            "print(*compare.matmul_gflops('float32', n=64, repeats=2, rounds=2))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [float(rate) for rate in result.stdout.split()] == [2 * 2 * 64**3 / 1e9] * 2


def test_compare_times_each_peer_in_each_dtype():
    # Unit-level: the sides each peer gets, and their names in the table.
    code = ("from experiments.benchmarks import compare; "
            "print(list(compare.peer_sides({'torch': 1, 'flax_wmt': 2}, ['float32', 'bfloat16']))); "
            "print(list(compare.peer_sides({'torch': 1}, ['bfloat16'])))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        "['torch float32', 'torch bfloat16', 'flax_wmt float32', 'flax_wmt bfloat16']", "['torch']"]


@pytest.mark.slow
def test_compare_against_each_peer_at_its_best_dtype():
    # The whole benchmark at the Multi30k shape (a small peak product, one step a side): ours in
    # float32, torch in both dtypes, and the ratio against torch's faster step.
    result = subprocess.run([sys.executable, "-m", "experiments.benchmarks.compare", "--shapes=multi30k",
                             "--dtype=float32", "--peer_dtypes=float32,bfloat16", "--steps=1", "--rounds=2",
                             "--peak_size=128", "--peak_rounds=1"], cwd=REPO, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| shape")).strip("| ").split(" | ")
    row = dict(zip(header, next(line for line in lines if line.startswith("| multi30k")).strip("| ").split(" | ")))
    assert list(row)[2:9] == ["ours tok/s", "torch float32 tok/s", "ours / torch float32", "torch bfloat16 tok/s",
                              "ours / torch bfloat16", "ours / torch best", "ours GFLOP/s (of peak)"]
    ours, f32, bf16 = (float(row[k].replace(",", "")) for k in ("ours tok/s", "torch float32 tok/s",
                                                                "torch bfloat16 tok/s"))
    ratio = lambda key: float(row[key].strip("*x"))  # noqa: E731
    assert ratio("ours / torch float32") == pytest.approx(ours / f32, abs=0.01)
    assert ratio("ours / torch best") == pytest.approx(ours / max(f32, bf16), abs=0.01)
    assert sum(line.endswith("up to its end in the side's dtype.") for line in lines) == 2  # both dtypes' peaks
    faults = next(line for line in lines if line.startswith("multi30k: page faults in the timed rounds, "))
    assert [part.rsplit(" ", 1)[0] for part in faults.split(", ")[1:]] == ["ours", "torch float32", "torch bfloat16"]


# A compiled module as XLA's CPU backend prints it, cut down: a dot handed to YNNPACK in a fusion, a
# reduction, a transposing copy, an elementwise fusion inside a loop body, a custom call.
_HLO = """HloModule jit_step, is_scheduled=true

%fused_dot (param_0: f32[4,8], param_1: f32[8,2]) -> f32[4,2] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  %param_1 = f32[8,2]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,2]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%region_add (a.1: f32[], b.1: f32[]) -> f32[] {
  %a.1 = f32[] parameter(0)
  %b.1 = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%a.1, %b.1)
}

%fused_sum (param_0.1: f32[4,2]) -> f32[4] {
  %param_0.1 = f32[4,2]{1,0} parameter(0)
  %constant.1 = f32[] constant(0)
  ROOT %reduce.1 = f32[4]{0} reduce(%param_0.1, %constant.1), dimensions={1}, to_apply=%region_add
}

%fused_transpose (param_0.2: f32[4,2]) -> f32[2,4] {
  %param_0.2 = f32[4,2]{1,0} parameter(0)
  %transpose.1 = f32[2,4]{0,1} transpose(%param_0.2), dimensions={1,0}
  ROOT %copy.1 = f32[2,4]{1,0} copy(%transpose.1)
}

%fused_relu (param_0.3: f32[4,2]) -> f32[4,2] {
  %param_0.3 = f32[4,2]{1,0} parameter(0)
  %constant.2 = f32[] constant(0)
  %broadcast.1 = f32[4,2]{1,0} broadcast(%constant.2), dimensions={}
  ROOT %maximum.1 = f32[4,2]{1,0} maximum(%param_0.3, %broadcast.1)
}

%body (param.4: (s32[], f32[4,2])) -> (s32[], f32[4,2]) {
  %param.4 = (s32[], f32[4,2]{1,0}) parameter(0)
  %gte.1 = s32[] get-tuple-element(%param.4), index=0
  %gte.2 = f32[4,2]{1,0} get-tuple-element(%param.4), index=1
  %relu_fusion = f32[4,2]{1,0} fusion(%gte.2), kind=kLoop, calls=%fused_relu
  ROOT %tuple.1 = (s32[], f32[4,2]{1,0}) tuple(%gte.1, %relu_fusion)
}

%cond (param.5: (s32[], f32[4,2])) -> pred[] {
  %param.5 = (s32[], f32[4,2]{1,0}) parameter(0)
  %gte.3 = s32[] get-tuple-element(%param.5), index=0
  %constant.3 = s32[] constant(3)
  ROOT %compare.1 = pred[] compare(%gte.3, %constant.3), direction=LT
}

ENTRY %main (x: f32[4,8], w: f32[8,2]) -> (f32[2,4], f32[4]) {
  %x = f32[4,8]{1,0} parameter(0)
  %w = f32[8,2]{1,0} parameter(1)
  %ynn_fusion = f32[4,2]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_dot
  %sum_fusion = f32[4]{0} fusion(%ynn_fusion), kind=kLoop, calls=%fused_sum
  %copy_fusion = f32[2,4]{1,0} fusion(%ynn_fusion), kind=kLoop, calls=%fused_transpose
  %constant.4 = s32[] constant(0)
  %tuple.2 = (s32[], f32[4,2]{1,0}) tuple(%constant.4, %ynn_fusion)
  %while.1 = (s32[], f32[4,2]{1,0}) while(%tuple.2), condition=%cond, body=%body
  %custom-call.1 = f32[4,2]{1,0} custom-call(%ynn_fusion), custom_call_target="something"
  ROOT %tuple.3 = (f32[2,4]{1,0}, f32[4]{0}) tuple(%copy_fusion, %sum_fusion)
}
"""


def test_profile_step_gives_each_op_the_kind_of_what_it_holds():
    from experiments.benchmarks import profile_step  # noqa: PLC0415

    instructions, computations = profile_step.parse_hlo(_HLO)
    assert instructions["while.1"] == profile_step.Instruction("while", "(s32[], f32[4,2]{1,0})", ("cond", "body"))
    assert instructions["sum_fusion"].called == ("fused_sum",) and instructions["reduce.1"].called == ("region_add",)
    assert computations["body"] == ["param.4", "gte.1", "gte.2", "relu_fusion", "tuple.1"]
    kinds = profile_step.op_kinds(_HLO)
    assert {op: kinds[op] for op in ("ynn_fusion", "sum_fusion", "copy_fusion", "relu_fusion", "while.1",
                                     "custom-call.1", "dot.1", "maximum.1")} == {
        "ynn_fusion": "products", "sum_fusion": "reductions", "copy_fusion": "copies", "relu_fusion": "elementwise",
        "while.1": "container", "custom-call.1": "other", "dot.1": "products", "maximum.1": "elementwise"}


def test_profile_step_names_the_part_of_the_model_from_the_op_name():
    from experiments.benchmarks import profile_step  # noqa: PLC0415

    path = "jit(train_step)/jvp(EncoderDecoder)/EncoderDecoder.decode/decoder/layer_0/"
    backward = "jit(train_step)/transpose(jvp(EncoderDecoder))/EncoderDecoder.encode/encoder/layer_1/"
    assert profile_step.part_of(path + "self_attention_norm/reduce_sum") == "forward: layer norms"
    assert profile_step.part_of(path + "cross_attention/cross_attention._project/BTD,DNH->BTNH/dot_general") == (
        "forward: attention projections")
    assert profile_step.part_of(backward + "self_attention/BKGTH,BKSH->BKGTS/dot_general") == (
        "backward: attention: scores, softmax, weighted sum")
    assert profile_step.part_of(backward + "feed_forward/mul") == "backward: feed-forward"
    assert profile_step.part_of("jit(train_step)/jvp()/while/body/closed_call/exp") == (
        "loops outside the model (the fused loss, its gradients included)")
    assert profile_step.part_of("jit(train_step)/sqrt") == "the rest: optimizer, loss outside loops, casts"
    line = ('  %ynn_fusion.9 = f32[4,2]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_dot, '
            f'metadata={{op_name="{path}feed_forward/dot_general" stack_frame_id=3}}')
    instructions, _ = profile_step.parse_hlo("ENTRY %main (x: f32[4,8], w: f32[8,2]) -> f32[4,2] {\n" + line + "\n}\n")
    assert instructions["ynn_fusion.9"].op_name == path + "feed_forward/dot_general"
    times = profile_step.OpTimes(1.0, {"ynn_fusion.9": 0.25, "unknown.1": 0.5}, {}, {})
    parts = profile_step.by_part(times, {"ynn_fusion.9": "products"}, instructions)
    assert parts["forward: feed-forward"]["products"] == 0.25 and parts["unnamed"]["other"] == 0.5


def test_profile_step_sums_the_traced_ops_of_a_jitted_function(tmp_path):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from experiments.benchmarks import profile_step  # noqa: PLC0415

    def f(x, w):
        y = jax.nn.relu(x @ w)
        total, _ = jax.lax.scan(lambda c, row: (c + jnp.sum(row * row), None), 0.0, y)  # a while loop
        return jnp.mean(y, axis=-1) * total

    x, w = jnp.ones((256, 128)), jnp.ones((128, 256))
    fn = jax.jit(f)
    jax.block_until_ready(fn(x, w))
    kinds = profile_step.op_kinds(fn.lower(x, w).compile().as_text())
    times = profile_step.trace_op_times(lambda: fn(x, w), 2, str(tmp_path), module_prefix="jit_f")
    assert times.wall_seconds > 0 and set(times.by_op) <= set(kinds)  # every traced op is in the HLO
    assert set(times.calls.values()) >= {1.0}  # per step: ops outside the loop ran once a step
    seconds = profile_step.by_kind(times, kinds)
    assert seconds["products"] > 0 and seconds["reductions"] > 0
    assert sum(seconds.values()) == pytest.approx(sum(s for op, s in times.by_op.items() if kinds[op] != "container"))


@pytest.mark.slow
def test_profile_step_prints_time_by_kind_and_by_part_of_the_model():
    result = subprocess.run([sys.executable, "-m", "experiments.benchmarks.profile_step", "--shape=multi30k",
                             "--steps=1", "--top=5"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.strip("| ").split(" | ") for line in result.stdout.splitlines() if line.startswith("| ")]
    kinds = [row for row in rows if row[0] in ("products", "reductions", "copies", "elementwise", "other")]
    assert [row[0] for row in kinds] == ["products", "reductions", "copies", "elementwise", "other"]
    assert sum(float(row[2].rstrip("%")) for row in kinds) == pytest.approx(100, abs=0.3)
    assert float(kinds[0][1].replace(",", "")) > 0  # the products took time
    parts = {row[0]: row[1:] for row in rows if len(row) == 8 and row[0] not in ("part of the model", "---")}
    assert sum(float(row[1].rstrip("%")) for row in parts.values()) == pytest.approx(100, abs=0.3)
    assert {"forward: attention projections", "backward: attention: scores, softmax, weighted sum",
            "forward: layer norms", "loops outside the model (the fused loss, its gradients included)"} <= set(parts)
    assert float(parts["forward: attention projections"][2].replace(",", "")) > 0  # its products
    top = [row for row in rows if len(row) == 6 and row[0] not in ("op", "---")]
    assert len(top) == 5 and all(row[1] in ("products", "reductions", "copies", "elementwise", "other") for row in top)
