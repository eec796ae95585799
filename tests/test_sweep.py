"""`retro-jax sweep`: expansion into uniquely named runs, overrides that the CLI parses back to the
intended config, the local and TPU launchers, resuming a sweep, and the CLI's dry run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from retro_jax.config import training_inputs
from retro_jax.errors import RetroError
from retro_jax.sweep import (
    REPO,
    PlannedRun,
    Run,
    apply_overrides,
    command_lines,
    expand,
    load_module,
    load_sweeps,
    override_args,
    product,
    run_sweep,
    share_work,
)

EXPERIMENTS = REPO / "experiments"
TINY_SWEEP = """
from retro_jax.sweep import Run, load_module

get_config = load_module({tiny!r}).get_config

def get_sweep(arg=""):
    return {{"width": [
        Run("d32", {{"model.d_model": 32}}, ("model-info",)),
        Run("d64", {{"model.d_model": 64, "train.retrofit_from": "{{root}}/width-d32"}},
            ("model-info",)),
    ]}}
"""


def tiny_config():
    return load_module(EXPERIMENTS / "tiny.py").get_config()


def test_product_joins_names_and_merges_overrides():
    k = [Run("k1", {"train.num_neighbours": 1}), Run("k2", {"train.num_neighbours": 2})]
    cca = [Run("l6", {"model.cca_layers": (6,)}), Run("all", {"model.cca_layers": (1, 2)})]
    runs = product(k, cca)
    assert [r.name for r in runs] == ["k1-l6", "k1-all", "k2-l6", "k2-all"]
    assert runs[3].overrides == {"train.num_neighbours": 2, "model.cca_layers": (1, 2)}
    with pytest.raises(RetroError, match="both set"):
        product(k, k)
    with pytest.raises(RetroError, match="different commands"):
        product([Run("a", {}, ("train",))], [Run("b", {"x.y": 1}, ("eval",))])
    with pytest.raises(RetroError, match="run name"):
        Run("has space")


def test_expand_names_workdirs_and_root_placeholder():
    sweeps = load_sweeps(str(EXPERIMENTS / "retro_172m.py"))
    assert set(sweeps) >= {"neighbours", "cca", "continuation", "eval_db", "retrofit"}
    runs = expand(sweeps, "gs://b/s/")
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    assert "neighbours-k4" in names and "cca-layer6" in names and "eval_db-db-2b" in names
    by_name = {r.name: r for r in runs}
    assert by_name["neighbours-k4"].workdir == "gs://b/s/neighbours-k4"
    assert by_name["neighbours-k4"].overrides["train.num_neighbours"] == 4
    assert by_name["cca-every3-from1"].overrides["model.cca_layers"] == (1, 4, 7, 10)
    assert by_name["cca-every-layer"].overrides["model.cca_layers"] == tuple(range(1, 13))
    assert by_name["continuation-without"].overrides["data.neighbour_continuation"] is False
    retrofit = by_name["retrofit-retrofit"]
    assert retrofit.overrides["train.retrofit_from"] == "gs://b/s/retrofit-baseline"
    assert by_name["eval_db-db-9b"].commands == ("prepare", "eval")
    assert by_name["eval_db-db-9b"].overrides["eval.checkpoint_workdir"] == "gs://b/s/eval_db-model"
    only = expand(sweeps, "w", ["cca", "neighbours"])
    assert [r.name for r in only][:4] == [
        "cca-paper",
        "cca-layer6",
        "cca-every3-from1",
        "cca-every-layer",
    ]
    with pytest.raises(RetroError, match="unknown sweep"):
        expand(sweeps, "w", ["nope"])
    with pytest.raises(RetroError, match="not unique"):
        expand({"s": [Run("a"), Run("a")]}, "w")
    # The baseline twin has no retrieval to ablate.
    with pytest.raises(RetroError, match="no sweeps"):
        load_sweeps(str(EXPERIMENTS / "retro_172m.py") + ":baseline")


@pytest.mark.parametrize("size_file", ["retro_172m.py", "retro_7_5b.py"])
def test_override_args_parse_back_to_the_same_config(size_file):
    """What a run's command line says is exactly the config the sweep checked."""
    spec = str(EXPERIMENTS / size_file)

    def parse(*args):
        argv = [sys.argv[0], f"--config={spec}", *args]
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=argv)
        values(argv)
        return values.config

    config = parse()
    for run in expand(load_sweeps(spec), "gs://b/s"):
        expected = apply_overrides(config, run.overrides)
        values = parse(*override_args(run.overrides))
        assert values.to_dict() == expected.to_dict(), run.name
        for key, value in run.overrides.items():
            section, field = key.split(".")
            assert values[section][field] == value, (run.name, key)


def test_apply_overrides_checks_keys_and_types():
    config = tiny_config()
    changed = apply_overrides(config, {"train.steps": 7, "model.cca_layers": [2]})
    assert changed.train.steps == 7 and changed.model.cca_layers == (2,)
    assert config.train.steps != 7  # a copy
    with pytest.raises(RetroError, match="no key"):
        apply_overrides(config, {"train.stpes": 1})
    with pytest.raises(RetroError, match="no section"):
        apply_overrides(config, {"trian.steps": 1})
    with pytest.raises(RetroError, match="train.steps"):
        apply_overrides(config, {"train.steps": "many"})


def _command(argv):
    return next(a for a in argv if a in ("prepare", "train", "eval"))


def _workdir(argv):
    return next(a for a in argv if a.startswith("--workdir="))


def test_run_sweep_runs_each_command_records_status_and_resumes(tmp_path, capsys):
    spec = str(EXPERIMENTS / "retro_425m.py")
    calls = []

    def execute(argv):
        calls.append(argv)
        failed = "continuation-without" in " ".join(argv) and "train" in argv
        return subprocess.CompletedProcess(argv, 1 if failed else 0)

    config = load_module(spec).get_config()
    workdir = str(tmp_path / "sweep")
    with pytest.raises(RetroError, match="continuation-without"):
        run_sweep(config, spec, workdir, selected=["continuation"], execute=execute)
    assert [(_command(c), _workdir(c)) for c in calls] == [
        ("prepare", f"--workdir={workdir}/continuation-with"),
        ("train", f"--workdir={workdir}/continuation-with"),
        ("eval", f"--workdir={workdir}/continuation-with"),
        ("prepare", f"--workdir={workdir}/continuation-without"),
        ("train", f"--workdir={workdir}/continuation-without"),
    ]
    assert "--config.data.neighbour_continuation=False" in calls[-1]
    status = json.loads(Path(workdir, "sweep.json").read_text())
    assert [r["status"] for r in status["runs"]] == ["done", "failed"]
    # Rerun: the finished run is skipped, the failed one starts again.
    calls.clear()

    def succeed(argv):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0)

    run_sweep(config, spec, workdir, selected=["continuation"], execute=succeed)
    assert {_workdir(c) for c in calls} == {f"--workdir={workdir}/continuation-without"}
    status = json.loads(Path(workdir, "sweep.json").read_text())
    assert [r["status"] for r in status["runs"]] == ["done", "done"]
    # Checked before anything runs: overrides must name keys of the config.
    bare = tiny_config()
    del bare.data.retrieval_max_tokens  # the key the eval_db sweep overrides
    with pytest.raises(RetroError, match="no key"):
        run_sweep(bare, spec, workdir, selected=["eval_db"], execute=execute)
    with pytest.raises(RetroError, match="--workdir is required"):
        run_sweep(config, spec, None)


def test_runs_share_the_prepared_data_and_train_each_distinct_model_once(tmp_path):
    spec = str(EXPERIMENTS / "retro_172m.py")
    config = load_module(spec).get_config()
    calls = []

    def execute(argv):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0)

    root = str(tmp_path / "sweep")
    runs = {r.name: r for r in run_sweep(config, spec, root, execute=execute)}
    assert len(runs) == 19
    shared = f"--config.data.prepare_dir={root}/prepare"
    for argv in calls:
        run = _workdir(argv).rsplit("/", 1)[1]
        capped = run.startswith("eval_db-db-") and run != "eval_db-db-full"
        assert (shared in argv) != capped, argv  # capped databases are prepared apart
    # Each distinct model trains once: k=2, the paper's CCA, with continuation, the eval_db
    # model and the retrofit sweep's RETRO are one model.
    trained = [_workdir(c).rsplit("/", 1)[1] for c in calls if _command(c) == "train"]
    assert len(trained) == len(set(trained)) == 9
    assert not {"cca-paper", "continuation-with", "eval_db-model", "retrofit-retro"} & set(trained)
    # A run that does not train scores the model that was trained with its config.
    for run in runs.values():
        source = run.overrides.get("eval.checkpoint_workdir")
        if "eval" in run.commands and "train" not in run.commands:
            owner = next(r for r in runs.values() if r.workdir == source)
            assert "train" in owner.commands
            mine = apply_overrides(config, run.overrides)
            theirs = apply_overrides(config, owner.overrides)
            if not run.name.startswith("eval_db-db-"):
                assert training_inputs(mine) == training_inputs(theirs), run.name
    assert runs["eval_db-db-9b"].overrides["eval.checkpoint_workdir"] == f"{root}/neighbours-k2"
    assert runs["cca-paper"].overrides["eval.checkpoint_workdir"] == f"{root}/neighbours-k2"


def test_share_work_groups_runs_by_what_prepare_reads():
    config = tiny_config()
    planned = [
        PlannedRun("a", "r/a", {"data.max_docs": 5}, ("prepare", "train")),
        PlannedRun("b", "r/b", {"data.max_docs": 5, "train.steps": 7}, ("prepare", "train")),
        PlannedRun("c", "r/c", {"data.neighbour_continuation": False}, ("prepare", "train")),
        PlannedRun("d", "r/d", {"data.max_docs": 9}, ("prepare", "train")),
    ]
    runs, notes = share_work(config, planned, "r")
    dirs = [r.overrides.get("data.prepare_dir") for r in runs]
    assert dirs == ["r/prepare-a", "r/prepare-a", "r/prepare", None]
    assert notes == {} and all("train" in r.commands for r in runs)
    config.data.prepare_dir = "/elsewhere"  # the user's own choice is kept
    runs, _ = share_work(config, planned, "r")
    assert all("data.prepare_dir" not in r.overrides for r in runs)


def test_tpu_launcher_commands(tmp_path):
    spec = str(EXPERIMENTS / "retro_172m.py")
    run = expand(load_sweeps(spec), "gs://b/s", ["neighbours"])[0]
    argv = command_lines(run, "experiments/retro_172m.py", {"train.steps": 10}, "tpu")
    assert argv[1] == [
        "env",
        "WAIT=1",
        "RUN_NAME=neighbours-k1-train",
        str(REPO / "tpu" / "run.sh"),
        "train",
        "--config=experiments/retro_172m.py",
        "--workdir=gs://b/s/neighbours-k1",
        "--config.train.steps=10",
        "--config.train.num_neighbours=1",
        "--config.eval.num_neighbours=1",
    ]
    config = load_module(spec).get_config()
    with pytest.raises(RetroError, match="gs://"):
        run_sweep(config, spec, str(tmp_path), launcher="tpu", execute=None)
    outside = tmp_path / "cfg.py"
    outside.write_text(Path(spec).read_text())
    with pytest.raises(RetroError, match="not inside the repository"):
        run_sweep(config, str(outside), "gs://b/s", launcher="tpu", dry_run=True)


def _cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "retro_jax.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_dry_run_lists_runs():
    result = _cli(
        "sweep", "experiments/retro_172m.py", "--dry-run", "--sweep=cca", "--launcher=tpu"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "sweep of experiments/retro_172m.py: 4 runs under WORKDIR"
    assert sum("tpu/run.sh train" in line for line in lines) == 4
    assert "model.cca_layers=(6,)" in result.stdout
    result = _cli("sweep", "experiments/retro_172m.py", "--dry-run", "--sweep=bogus")
    assert result.returncode == 2 and "unknown sweep" in result.stderr


def test_cli_runs_a_sweep_locally(tmp_path):
    """Two real runs of `retro-jax model-info`, each with its own overrides and workdir."""
    config_file = tmp_path / "tiny_sweep.py"
    config_file.write_text(TINY_SWEEP.format(tiny=str(EXPERIMENTS / "tiny.py")))
    workdir = tmp_path / "runs"
    result = _cli("sweep", str(config_file), f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr
    status = json.loads((workdir / "sweep.json").read_text())
    assert [(r["name"], r["status"]) for r in status["runs"]] == [
        ("width-d32", "done"),
        ("width-d64", "done"),
    ]
    assert status["runs"][1]["overrides"]["train.retrofit_from"] == f"{workdir}/width-d32"
    # Each run's own output: the two widths give two different parameter reports.
    outputs = result.stdout.split("== width-")[1:]
    assert len(outputs) == 2 and outputs[0].split("\n", 1)[1] != outputs[1].split("\n", 1)[1]
