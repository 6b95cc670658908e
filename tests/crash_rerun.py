"""pytest-xdist: a test whose worker process died runs once more, in a fresh worker, and says so.

Why: XLA:CPU's eight simulated devices can deadlock at a collective. Seen in CI (the slow suite lost
a worker in `test_lm_and_mlm_reduce_loss[mlm_synthetic]` after a ~20-minute wait; an earlier loss in
`test_config_trains_two_steps[wmt14_ende_big]` may have been the same) and reproduced with jax 0.10.2: four processes, two at
a time on two cores, trained the LM and MLM tests' models in a loop; in ~270 runs, one all-reduce
waited forever with seven of its eight devices arrived, while the eighth device's launch sat in
`CpuPjRtRawLoadedExecutable::Execute` on a semaphore (gdb). XLA's collective watchdog then aborts the process
(`--xla_cpu_collective_call_terminate_timeout_seconds`, set in conftest.py), and xdist reports the
test as crashed. Nothing in the test's own code runs at that point, and the same test passes when
run again.

What: only a crash is retried (a fatal signal, not an assertion or an exception: those fail at once,
as before), once per test; a second crash fails the test. Each retry prints `R` in the progress line,
counts as "rerun" in the closing line, and is listed with its crash message in a "crashed and rerun"
section, so a run that needed one says so. Without xdist (no `-n`) nothing changes.

Loaded from conftest.py; tests/test_crash_rerun.py runs it in a pytest of its own.
"""

import pytest

RERUNS = 1
_crashes: dict[str, int] = {}  # the controller's count of crashes per test id


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown (and never called) without xdist
def pytest_handlecrashitem(crashitem: str, report: pytest.TestReport, sched) -> None:
    """xdist's controller: `crashitem`'s worker died. Schedules the test again unless it already crashed RERUNS times."""
    _crashes[crashitem] = _crashes.get(crashitem, 0) + 1
    if _crashes[crashitem] <= RERUNS:
        sched.mark_test_pending(crashitem)
        report.outcome = "rerun"  # not "failed": the session's failure count and exit status ignore it


def pytest_report_teststatus(report: pytest.TestReport):
    if report.outcome == "rerun":
        return "rerun", "R", ("RERUN", {"yellow": True})
    return None


def pytest_terminal_summary(terminalreporter) -> None:
    reruns = terminalreporter.stats.get("rerun", [])
    if reruns:
        terminalreporter.section("crashed and rerun", yellow=True)
        for report in reruns:
            terminalreporter.line(f"RERUN {report.nodeid}: {report.longrepr}")
