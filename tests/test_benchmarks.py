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
