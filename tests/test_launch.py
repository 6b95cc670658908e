"""Tests for launch/*: --help, argument checks, the commands --dry-run prints, and that a real run
executes those same commands.

Nothing here reaches a cloud or a cluster: every external program the scripts call (gcloud, srun,
scontrol, python3) is a stub in tmp_path/bin, first on PATH. Each stub appends its argv, working
directory and the environment variables of interest to a JSON-lines log, so a dry run can be shown
to execute nothing (empty log) and a real run to execute exactly what was asked (the log).
"""

import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ("local.sh", "gpu_single_host.sh", "slurm_multinode.sbatch", "tpu_vm.sh")
LOGGED_ENV = (
    "JAX_PLATFORMS",
    "CUDA_VISIBLE_DEVICES",
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "TFDS_DATA_DIR",
)
# An argument that needs quoting at every level: a space and a single quote.
TRICKY = "--config.note=it's a test"

# One stub for every program; it acts on the name it was called by.
STUB = f"""#!{sys.executable}
import json, os, shutil, subprocess, sys

name = os.path.basename(sys.argv[0])
argv = sys.argv[1:]
with open(os.environ["LAUNCH_LOG"], "a") as log:
    env = {{k: os.environ[k] for k in {LOGGED_ENV!r} if k in os.environ}}
    log.write(json.dumps({{"prog": name, "argv": argv, "cwd": os.getcwd(), "env": env}}) + "\\n")
if any(os.environ.get("STUB_FAIL_ON", "\\0") in a for a in argv):
    sys.exit(1)
if name == "scontrol":  # scontrol show hostnames NODELIST
    print("\\n".join(os.environ["STUB_HOSTS"].split()))
elif name == "srun":  # run the command once per task, as SLURM would on each node
    command = argv[next(i for i, a in enumerate(argv) if not a.startswith("-")):]
    ntasks = int(next(a.split("=")[1] for a in argv if a.startswith("--ntasks=")))
    for rank in range(ntasks):
        subprocess.run(command, env={{**os.environ, "SLURM_PROCID": str(rank)}}, check=True)
elif name == "gcloud" and argv[3] == "scp":  # gcloud compute tpus tpu-vm scp SRC VM:DEST
    shutil.copy(argv[4], os.path.join(os.environ["HOME"], argv[5].split(":", 1)[1]))
elif name == "gcloud" and argv[3] == "ssh":  # run --command as the worker's login shell would
    command = next(a.split("=", 1)[1] for a in argv if a.startswith("--command="))
    sys.exit(subprocess.run(["bash", "-c", command], cwd=os.environ["HOME"]).returncode)
"""

SLURM_ENV = {
    "SLURM_JOB_NODELIST": "gpu[01-02]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NTASKS": "2",
    "SLURM_CPUS_ON_NODE": "64",
    "SLURM_SUBMIT_DIR": str(REPO),
    "STUB_HOSTS": "gpu01 gpu02",
}
TPU_BASE = ["--name=mt-base", "--zone=us-central2-b"]
# Arguments that pass every other check, so a test can break exactly one thing.
VALID_ARGS = {
    "local.sh": [],
    "gpu_single_host.sh": [],
    "slurm_multinode.sbatch": [],
    "tpu_vm.sh": [*TPU_BASE, "--accelerator-type=v4-8", "run"],
}


@pytest.fixture
def sandbox(tmp_path):
    """Environment with the stubs first on PATH and a throwaway HOME and TMPDIR."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for prog in ("gcloud", "srun", "scontrol", "python3"):
        (bin_dir / prog).write_text(STUB)
        (bin_dir / prog).chmod(0o755)
    for d in ("home", "tmp"):
        (tmp_path / d).mkdir()
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "TMPDIR": str(tmp_path / "tmp"),
        "LAUNCH_LOG": str(tmp_path / "log.jsonl"),
    }
    return tmp_path, env


def launch(sandbox, script, *args, **extra_env):
    _, env = sandbox
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env={**env, **extra_env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )


def stub_calls(sandbox):
    log = pathlib.Path(sandbox[1]["LAUNCH_LOG"])
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def dry_run(sandbox, script, *args, **extra_env):
    """Runs with --dry-run; checks it succeeded and executed nothing; returns the printed lines.

    The one program a dry run may call is the read-only `scontrol show hostnames`, which the SLURM
    script needs to print the coordinator's address.
    """
    result = launch(sandbox, script, "--dry-run", *args, **extra_env)
    assert result.returncode == 0, result.stderr
    executed = [c for c in stub_calls(sandbox) if c["argv"][:2] != ["show", "hostnames"]]
    assert executed == [], "a dry run executed a command"
    return result.stdout.splitlines()


def assert_usage_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in result.stderr


# --- Every script ----------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_executable(script):
    assert os.access(LAUNCH / script, os.X_OK)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_describes_options(sandbox, script):
    result = launch(sandbox, script, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage:")
    for option in ("--entry", "--dry-run", "Example:"):
        assert option in result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_rejects_unknown_option_and_points_to_separator(sandbox, script):
    result = launch(sandbox, script, *VALID_ARGS[script], "--config=x.py", **SLURM_ENV)
    assert_usage_error(result, "unknown", "'--config", "go after --", "--help")


@pytest.mark.parametrize("script", SCRIPTS)
def test_rejects_option_without_value(sandbox, script):
    result = launch(sandbox, script, *VALID_ARGS[script], "--entry", **SLURM_ENV)
    assert_usage_error(result, "--entry needs a value")


@pytest.mark.parametrize("script", SCRIPTS)
def test_rejects_entry_that_is_not_a_module(sandbox, script):
    args = [*VALID_ARGS[script], "--entry=experiments/train.py"]
    result = launch(sandbox, script, "--dry-run", *args, **SLURM_ENV)
    assert_usage_error(result, "Python module name", "experiments/train.py")


# --- local.sh --------------------------------------------------------------------------------


def test_local_dry_run_passes_arguments_through(sandbox):
    lines = dry_run(sandbox, "local.sh", "--", "--config=experiments/configs/base.py", TRICKY)
    assert lines == [
        f"cd {REPO}",
        "python3 -m experiments.train --config=experiments/configs/base.py "
        "'--config.note=it'\\''s a test'",
    ]
    # The printed line is a shell command that gives back the original arguments.
    assert shlex.split(lines[1])[-1] == TRICKY


@pytest.mark.parametrize("platform, prefix", [("cpu", "env JAX_PLATFORMS=cpu "),
                                              ("gpu", "env JAX_PLATFORMS=cuda "),
                                              ("auto", "")])
def test_local_platform_sets_jax_platforms(sandbox, platform, prefix):
    lines = dry_run(sandbox, "local.sh", f"--platform={platform}", "--entry", "experiments.evaluate")
    assert lines[-1] == f"{prefix}python3 -m experiments.evaluate"


def test_local_install_creates_venv_and_installs_project(sandbox):
    venv = sandbox[0] / "venv"
    lines = dry_run(sandbox, "local.sh", f"--venv={venv}", "--install")
    assert lines == [
        f"python3 -m venv {venv}",
        f"{venv}/bin/python -m pip install --upgrade pip",
        f"{venv}/bin/python -m pip install -e {REPO}",
        f"cd {REPO}",
        f"{venv}/bin/python -m experiments.train",
    ]


@pytest.mark.parametrize("args, message", [
    (["--platform=tpu"], "--platform must be auto, cpu or gpu, got 'tpu'"),
    (["--install"], "--install needs --venv DIR"),
    (["--venv=/nonexistent/venv"], "no virtual environment at '/nonexistent/venv'"),
])
def test_local_rejects_bad_arguments(sandbox, args, message):
    assert_usage_error(launch(sandbox, "local.sh", "--dry-run", *args), message)


def test_local_run_executes_the_printed_command(sandbox):
    result = launch(sandbox, "local.sh", "--platform=cpu", "--", "--workdir=/tmp/w", TRICKY)
    assert result.returncode == 0, result.stderr
    [call] = stub_calls(sandbox)
    assert call["prog"] == "python3"
    assert call["argv"] == ["-m", "experiments.train", "--workdir=/tmp/w", TRICKY]
    assert call["cwd"] == str(REPO)
    assert call["env"] == {"JAX_PLATFORMS": "cpu"}
    assert "+ env JAX_PLATFORMS=cpu python3 -m experiments.train" in result.stderr


# --- gpu_single_host.sh ----------------------------------------------------------------------


def test_gpu_dry_run_selects_gpus_and_requires_cuda(sandbox):
    lines = dry_run(sandbox, "gpu_single_host.sh", "--gpus", "0,1,2,3", "--",
                    "--config=experiments/configs/base.py")
    assert lines == [
        f"cd {REPO}",
        "env JAX_PLATFORMS=cuda CUDA_VISIBLE_DEVICES=0,1,2,3 python3 -m experiments.train "
        "--config=experiments/configs/base.py",
    ]


def test_gpu_uses_every_gpu_by_default(sandbox):
    lines = dry_run(sandbox, "gpu_single_host.sh")
    assert lines[-1] == "env JAX_PLATFORMS=cuda python3 -m experiments.train"


@pytest.mark.parametrize("extra", ["cuda12", "cuda13"])
def test_gpu_install_uses_jax_cuda_extra(sandbox, extra):
    venv = sandbox[0] / "venv"
    args = [f"--venv={venv}", "--install"] + ([] if extra == "cuda12" else [f"--jax-extra={extra}"])
    lines = dry_run(sandbox, "gpu_single_host.sh", *args)
    assert lines[:4] == [
        f"python3 -m venv {venv}",
        f"{venv}/bin/python -m pip install --upgrade pip",
        f"{venv}/bin/python -m pip install --upgrade 'jax[{extra}]'",
        f"{venv}/bin/python -m pip install -e {REPO}",
    ]


@pytest.mark.parametrize("args, message", [
    (["--gpus=0,,1"], "--gpus must be comma-separated GPU indices"),
    (["--gpus=all"], "got 'all'"),
    (["--jax-extra=cuda11"], "--jax-extra must be cuda12 or cuda13, got 'cuda11'"),
    (["--install"], "--install needs --venv DIR"),
])
def test_gpu_rejects_bad_arguments(sandbox, args, message):
    assert_usage_error(launch(sandbox, "gpu_single_host.sh", "--dry-run", *args), message)


# --- slurm_multinode.sbatch ------------------------------------------------------------------


def test_slurm_dry_run_exports_coordinator_and_runs_one_task_per_node(sandbox):
    lines = dry_run(sandbox, "slurm_multinode.sbatch", "--port=23456", "--",
                    "--config=experiments/configs/base.py", **SLURM_ENV)
    assert lines == [
        f"cd {REPO}",
        "export JAX_COORDINATOR_ADDRESS=gpu01:23456",
        "export JAX_NUM_PROCESSES=2",
        "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1 --label "
        "--cpus-per-task=64 bash -c 'export JAX_PROCESS_ID=\"${SLURM_PROCID}\"; exec \"$@\"' bash "
        "python3 -m experiments.train --config=experiments/configs/base.py",
    ]


def test_slurm_sbatch_header_asks_for_one_task_per_node():
    header = [l for l in (LAUNCH / "slurm_multinode.sbatch").read_text().splitlines()
              if l.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1" in header


def test_slurm_run_gives_each_task_its_process_id(sandbox):
    venv = sandbox[0] / "venv"
    (venv / "bin").mkdir(parents=True)
    os.symlink(sandbox[0] / "bin" / "python3", venv / "bin" / "python")
    result = launch(sandbox, "slurm_multinode.sbatch", f"--venv={venv}", "--entry=experiments.evaluate",
                    "--", "--workdir=/shared/w", TRICKY, **SLURM_ENV)
    assert result.returncode == 0, result.stderr
    scontrol, srun, *tasks = stub_calls(sandbox)
    assert scontrol["argv"] == ["show", "hostnames", "gpu[01-02]"]
    assert srun["prog"] == "srun" and srun["cwd"] == str(REPO)
    assert [t["prog"] for t in tasks] == ["python", "python"]
    for rank, task in enumerate(tasks):
        assert task["argv"] == ["-m", "experiments.evaluate", "--workdir=/shared/w", TRICKY]
        assert task["env"] == {
            "JAX_COORDINATOR_ADDRESS": "gpu01:12355",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(rank),
        }


@pytest.mark.parametrize("env, args, message", [
    ({"SLURM_JOB_NODELIST": ""}, [], "SLURM_JOB_NODELIST and SLURM_JOB_NUM_NODES are not set"),
    ({"SLURM_NTASKS": "16"}, [], "SLURM_NTASKS=16 but 2 nodes: this script runs one task per node"),
    ({"STUB_HOSTS": "gpu01"}, [], "scontrol listed 1 hosts for 2 nodes"),
    ({"SLURM_SUBMIT_DIR": "/"}, [], "'/' is not the repository root"),
    ({}, ["--port=80"], "--port must be a number in 1024..65535, got '80'"),
    ({}, ["--port=http"], "got 'http'"),
    ({}, ["--venv=/nonexistent/venv"], "no virtual environment at '/nonexistent/venv'"),
])
def test_slurm_rejects_bad_arguments_and_environment(sandbox, env, args, message):
    result = launch(sandbox, "slurm_multinode.sbatch", "--dry-run", *args, **{**SLURM_ENV, **env})
    assert_usage_error(result, message)


def test_slurm_needs_scontrol(sandbox):
    (sandbox[0] / "bin" / "scontrol").unlink()
    result = launch(sandbox, "slurm_multinode.sbatch", "--dry-run", **SLURM_ENV)
    assert result.returncode != 0
    assert "scontrol not found" in result.stderr


# --- tpu_vm.sh -------------------------------------------------------------------------------


def test_tpu_dry_run_all_creates_sets_up_runs_and_deletes(sandbox):
    lines = dry_run(sandbox, "tpu_vm.sh", *TPU_BASE, "--accelerator-type=v4-32", "--project=proj",
                    "--tfds-data-dir=gs://bucket/tfds", "all", "--",
                    "--config=experiments/configs/base.py", "--workdir=gs://bucket/runs/base")
    archive = f"{sandbox[0]}/tmp/mt-base-transformer.tar.gz"
    where = "--zone=us-central2-b --project=proj"
    assert lines == [
        "python3 -m experiments.plan --topology=v4-32 --config=experiments/configs/base.py",
        f"gcloud compute tpus tpu-vm create mt-base --accelerator-type=v4-32 "
        f"--version=tpu-ubuntu2204-base {where}",
        f"bash -o pipefail -c 'git -C {REPO} ls-files -z --cached --others --exclude-standard "
        f"| tar -czf {archive} -C {REPO} --ignore-failed-read --null -T -'",
        f"gcloud compute tpus tpu-vm scp {archive} mt-base:transformer.tar.gz --worker=all {where}",
        f"rm -f {archive}",
        "gcloud compute tpus tpu-vm ssh mt-base --worker=all '--command=set -e; "
        'rm -rf "$HOME/transformer" && mkdir -p "$HOME/transformer" && '
        'tar -xzf "$HOME/transformer.tar.gz" -C "$HOME/transformer"; '
        "python3 -m pip install --upgrade pip; "
        'python3 -m pip install --upgrade "jax[tpu]"; '
        f"python3 -m pip install -e \"$HOME/transformer\"' {where}",
        "gcloud compute tpus tpu-vm ssh mt-base --worker=all '--command=cd \"$HOME/transformer\" "
        "&& export TFDS_DATA_DIR=gs://bucket/tfds && exec python3 -m experiments.train "
        f"--distributed --config=experiments/configs/base.py --workdir=gs://bucket/runs/base' {where}",
        f"gcloud compute tpus tpu-vm delete mt-base --quiet {where}",
    ]


@pytest.mark.parametrize("accelerator, version, distributed", [
    ("v4-8", "tpu-ubuntu2204-base", False),
    ("v4-32", "tpu-ubuntu2204-base", True),
    ("v5p-8", "v2-alpha-tpuv5", False),
    ("v5litepod-8", "v2-alpha-tpuv5-lite", False),
    ("v5litepod-16", "v2-alpha-tpuv5-lite", True),
    ("v6e-8", "v2-alpha-tpuv6e", False),
    ("v6e-64", "v2-alpha-tpuv6e", True),
])
def test_tpu_version_and_distributed_follow_accelerator(sandbox, accelerator, version, distributed):
    create, run = dry_run(sandbox, "tpu_vm.sh", *TPU_BASE, f"--accelerator-type={accelerator}",
                          "run", "create")  # order given does not matter
    assert create.startswith("gcloud compute tpus tpu-vm create mt-base ")
    assert f" --version={version} " in create
    assert " --worker=all " in run
    assert ("python3 -m experiments.train --distributed'" in run) == distributed
    assert ("python3 -m experiments.train'" in run) == (not distributed)


def test_tpu_explicit_version_spot_and_git_clone(sandbox):
    lines = dry_run(sandbox, "tpu_vm.sh", *TPU_BASE, "--accelerator-type=v4-8",
                    "--version=tpu-vm-base", "--spot", "--git-url=https://example.com/t.git",
                    "--git-ref=v1", "create", "setup")
    assert lines[0] == ("gcloud compute tpus tpu-vm create mt-base --accelerator-type=v4-8 "
                        "--version=tpu-vm-base --spot --zone=us-central2-b")
    assert len(lines) == 2  # cloned on the workers: nothing packed or copied from here
    assert lines[1].startswith("gcloud compute tpus tpu-vm ssh mt-base --worker=all '--command=set -e; "
                               'rm -rf "$HOME/transformer" && git clone https://example.com/t.git '
                               '"$HOME/transformer" && git -C "$HOME/transformer" checkout v1; ')


def test_tpu_delete_alone_needs_no_accelerator(sandbox):
    lines = dry_run(sandbox, "tpu_vm.sh", *TPU_BASE, "delete")
    assert lines == ["gcloud compute tpus tpu-vm delete mt-base --quiet --zone=us-central2-b"]


@pytest.mark.parametrize("args, message", [
    (["--zone=us-central2-b", "delete"], "--name is required"),
    (["--name=mt-base", "delete"], "--zone is required"),
    ([*TPU_BASE], "no step given"),
    ([*TPU_BASE, "launch"], "unknown step 'launch'"),
    ([*TPU_BASE, "create"], "--accelerator-type is required by the create and run steps"),
    ([*TPU_BASE, "run"], "--accelerator-type is required by the create and run steps"),
    ([*TPU_BASE, "--accelerator-type=tpu-v4", "create"], "--accelerator-type must look like v4-8"),
    (["--name=MT_base", "--zone=us-central2-b", "delete"], "--name must be lower-case"),
    (["--name=mt-base", "--zone=central", "delete"], "--zone must look like us-central2-b"),
    ([*TPU_BASE, "--git-ref=v1", "setup"], "--git-ref needs --git-url"),
])
def test_tpu_rejects_bad_arguments(sandbox, args, message):
    assert_usage_error(launch(sandbox, "tpu_vm.sh", "--dry-run", *args), message)


def test_tpu_run_copies_code_installs_and_runs_on_workers(sandbox):
    """A real (non-dry) run against the stub gcloud, whose `ssh` runs --command in a fake HOME."""
    result = launch(sandbox, "tpu_vm.sh", *TPU_BASE, "--accelerator-type=v5litepod-16",
                    "--tfds-data-dir=gs://bucket/tfds", "all", "--", "--workdir=gs://b/w", TRICKY)
    assert result.returncode == 0, result.stderr
    calls = stub_calls(sandbox)
    steps = [c["argv"][3] if c["prog"] == "gcloud" else c["prog"] for c in calls]
    # The preflight (TRICKY is a --config.* override), then the VM's life.
    assert steps == ["python3", "create", "scp", "ssh", "python3", "python3", "python3", "ssh", "python3",
                     "delete"]
    assert calls[0]["argv"] == ["-m", "experiments.plan", "--topology=v5litepod-16", TRICKY]
    calls = calls[1:]
    home = pathlib.Path(sandbox[1]["HOME"])
    code = home / "transformer"
    # The checkout arrived without ignored files, and the archive was cleaned up locally.
    assert (code / "launch" / "tpu_vm.sh").is_file() and (code / "setup.py").is_file()
    assert not (code / ".venv").exists() and not (code / ".git").exists()
    assert list((sandbox[0] / "tmp").iterdir()) == []
    installs = [c["argv"] for c in calls[3:6]]
    assert installs == [["-m", "pip", "install", "--upgrade", "pip"],
                        ["-m", "pip", "install", "--upgrade", "jax[tpu]"],
                        ["-m", "pip", "install", "-e", str(code)]]
    entry = calls[7]
    assert entry["cwd"] == str(code)
    assert entry["env"] == {"TFDS_DATA_DIR": "gs://bucket/tfds"}
    assert entry["argv"] == ["-m", "experiments.train", "--distributed", "--workdir=gs://b/w", TRICKY]


def test_tpu_failed_run_still_deletes_the_vm(sandbox):
    result = launch(sandbox, "tpu_vm.sh", *TPU_BASE, "--accelerator-type=v4-8", "create", "run",
                    "delete", STUB_FAIL_ON="exec python3")
    assert result.returncode != 0
    assert [c["argv"][3] for c in stub_calls(sandbox)] == ["create", "ssh", "delete"]


def test_tpu_preflight_compiles_the_run_first_and_a_failure_creates_nothing(sandbox):
    args = [*TPU_BASE, "--accelerator-type=v5litepod-8", "create", "--", "--config", "experiments/configs/c.py",
            "--config.model.remat=True", "--workdir=gs://b/w"]
    result = launch(sandbox, "tpu_vm.sh", *args)
    assert result.returncode == 0, result.stderr
    plan, create = stub_calls(sandbox)
    assert plan["prog"] == "python3" and plan["cwd"] == str(REPO)
    assert plan["argv"] == ["-m", "experiments.plan", "--topology=v5litepod-8", "--config",
                            "experiments/configs/c.py", "--config.model.remat=True"]
    assert create["argv"][3] == "create"

    (sandbox[0] / "log.jsonl").unlink(missing_ok=True)
    failed = launch(sandbox, "tpu_vm.sh", *args, STUB_FAIL_ON="experiments.plan")
    assert failed.returncode == 1 and "preflight failed: no VM created" in failed.stderr
    assert [c["prog"] for c in stub_calls(sandbox)] == ["python3"]  # create never ran

    (sandbox[0] / "log.jsonl").unlink(missing_ok=True)
    skipped = dry_run(sandbox, "tpu_vm.sh", "--no-preflight", *args)
    assert len(skipped) == 1 and skipped[0].startswith("gcloud compute tpus tpu-vm create")


def test_tpu_failed_create_deletes_nothing(sandbox):
    # A failed create may mean the name belongs to someone else's VM: never delete it then.
    result = launch(sandbox, "tpu_vm.sh", *TPU_BASE, "--accelerator-type=v4-8", "all",
                    STUB_FAIL_ON="--accelerator-type")
    assert result.returncode != 0
    assert [c["argv"][3] for c in stub_calls(sandbox)] == ["create"]
