"""crash_rerun: under pytest-xdist, a test whose worker dies runs once more; failures and repeat crashes still fail."""

import os
import re
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))

# Each test appends its name to runs.txt, so the count of runs is checked, not just the closing line.
_SUITE = """
import os

def record(name):
    with open(os.path.join(os.environ["RUNS_DIR"], "runs.txt"), "a") as f:
        f.write(name + "\\n")

def test_crashes_once():
    record("crashes_once")
    flag = os.path.join(os.environ["RUNS_DIR"], "crashed")
    if not os.path.exists(flag):
        open(flag, "w").close()
        os.abort()  # a fatal signal, as XLA's collective watchdog sends

def test_crashes_every_time():
    record("crashes_every_time")
    os.abort()

def test_fails():
    record("fails")
    assert False, "an ordinary failure"

def test_passes():
    record("passes")
"""


def test_a_crash_reruns_once_and_a_failure_does_not(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # the root here, not the project's ini
    (tmp_path / "test_suite.py").write_text(_SUITE)
    env = {**os.environ, "RUNS_DIR": str(tmp_path), "PYTHONPATH": TESTS, "PYTHONFAULTHANDLER": ""}
    result = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-p", "crash_rerun", "-p", "no:cacheprovider",
                             "test_suite.py"], check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert result.returncode == 1, out  # two tests failed
    assert re.search(r"2 failed, 2 passed, 2 rerun", out), out
    runs = (tmp_path / "runs.txt").read_text().split()
    assert sorted(runs) == sorted(["crashes_once"] * 2 + ["crashes_every_time"] * 2 + ["fails", "passes"]), runs
    assert "crashed and rerun" in out
    assert re.search(r"RERUN test_suite.py::test_crashes_once: worker 'gw\d' crashed", out), out
    failed = set(re.findall(r"FAILED (test_suite.py::\w+)", out))
    assert failed == {"test_suite.py::test_crashes_every_time", "test_suite.py::test_fails"}, out
