"""`retro-jax sweep experiments/X.py[:arg] [--sweep=NAME,...] [--dry-run] [--launcher=local|tpu]`.

A config file may define, next to `get_config(arg)`, a function `get_sweep(arg)` returning
{sweep name: [Run, ...]}. Each Run names a set of config overrides and the commands to run with
them. `sweep` expands the chosen sweeps into runs with unique names `{sweep}-{run}`, each in its
own workdir `{workdir}/{sweep}-{run}`, and either lists them (`--dry-run`), runs their commands
here one after another (`retro-jax CMD --config X.py:arg --workdir RUN_DIR --config.KEY=VALUE`),
or hands each command to `tpu/run.sh` (`--launcher=tpu`, which waits for it to finish).

The string `{root}` in an override value becomes the sweep's workdir, so a run can point at a
sibling (e.g. `train.retrofit_from="{root}/retrofit-baseline"`). `{workdir}/sweep.json` records
every run and its status; running the same sweep again skips the runs already done.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import re
import shlex
import shutil
import subprocess
import sys
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from retro_jax.errors import RetroError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep: config overrides {"train.num_neighbours": 4} and commands to run."""

    name: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    commands: tuple[str, ...] = ("train",)

    def __post_init__(self):
        if not _NAME.fullmatch(self.name):
            raise RetroError(f"sweep run name {self.name!r}: use letters, digits, '.', '_', '-'")
        if not self.commands:
            raise RetroError(f"sweep run {self.name!r} has no commands")


def product(*groups: Sequence[Run]) -> list[Run]:
    """Every combination of one run from each group: names joined by '-', overrides merged."""
    runs = []
    for combo in itertools.product(*groups):
        overrides: dict[str, Any] = {}
        for run in combo:
            clash = sorted(set(overrides) & set(run.overrides))
            if clash:
                raise RetroError(f"sweep product: runs both set {clash}")
            overrides.update(run.overrides)
        commands = {run.commands for run in combo}
        if len(commands) > 1:
            raise RetroError(f"sweep product: runs with different commands {sorted(commands)}")
        runs.append(Run("-".join(r.name for r in combo), overrides, commands.pop()))
    return runs


def load_module(path: str | Path) -> types.ModuleType:
    """Import a Python file by path (config files are not in a package), once per path."""
    path = Path(path).resolve()
    name = "retro_jax_file_" + re.sub(r"\W", "_", str(path))
    if name in sys.modules:
        return sys.modules[name]
    if not path.is_file():
        raise RetroError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """A run expanded for one sweep root: unique name, its workdir, resolved overrides."""

    name: str
    workdir: str
    overrides: dict[str, Any]
    commands: tuple[str, ...]


def load_sweeps(config_spec: str) -> dict[str, list[Run]]:
    """{sweep: runs} from `get_sweep(arg)` of the config file `path[:arg]`."""
    path, _, arg = config_spec.partition(":")
    module = load_module(path)
    if not hasattr(module, "get_sweep"):
        raise RetroError(f"{path} defines no get_sweep(arg): it has no sweeps")
    sweeps = module.get_sweep(arg)
    if not sweeps:
        raise RetroError(f"{config_spec}: get_sweep returned no sweeps for this argument")
    return dict(sweeps)


def expand(
    sweeps: Mapping[str, Sequence[Run]], root: str, selected: Sequence[str] = ()
) -> list[PlannedRun]:
    """The runs of the selected sweeps (all if none), named `{sweep}-{run}`, under `root`."""
    unknown = sorted(set(selected) - set(sweeps))
    if unknown:
        raise RetroError(f"unknown sweep(s) {unknown}; this config has {sorted(sweeps)}")
    root = root.rstrip("/")
    planned, seen = [], set()
    for sweep_name in selected or list(sweeps):
        for run in sweeps[sweep_name]:
            name = f"{sweep_name}-{run.name}"
            if name in seen:
                raise RetroError(f"sweep {sweep_name!r}: run name {run.name!r} is not unique")
            seen.add(name)
            overrides = {
                key: value.replace("{root}", root) if isinstance(value, str) else value
                for key, value in run.overrides.items()
            }
            planned.append(PlannedRun(name, f"{root}/{name}", overrides, run.commands))
    return planned


def share_work(config: ml_collections.ConfigDict, runs: list[PlannedRun], root: str):
    """Runs that would build the same thing build it once; returns (runs, notes {name: text}).

    - prepare: runs whose configs give `prepare` the same inputs (`config.prepare_inputs`) share
      one prepared folder (`data.prepare_dir`): `{root}/prepare` for the config's own inputs,
      `{root}/prepare-{first run}` for another group of several runs. Not when the config
      already names a `data.prepare_dir` (or has no such key).
    - train: a run whose trained model would equal an earlier run's (`config.training_inputs`)
      does not train again: its eval scores the earlier run's checkpoint
      (`eval.checkpoint_workdir`), and overrides naming its workdir (retrofit_from,
      baseline_workdir, checkpoint_workdir) name the earlier run's instead.
    """
    from retro_jax.config import prepare_inputs, training_inputs  # noqa: PLC0415

    resolved = [apply_overrides(config, run.overrides) for run in runs]
    notes: dict[str, str] = {}
    prepare_dirs: dict[str, str] = {}
    if "prepare_dir" in config.data and not config.data.prepare_dir:
        groups: dict[str, list[int]] = {}
        for i, (run, c) in enumerate(zip(runs, resolved)):
            if {"prepare", "train", "eval"} & set(run.commands):
                groups.setdefault(prepare_inputs(c), []).append(i)
        own = prepare_inputs(config)
        for key, members in groups.items():
            if key == own:
                prepare_dirs.update({runs[i].name: f"{root}/prepare" for i in members})
            elif len(members) > 1:
                shared = f"{root}/prepare-{runs[members[0]].name}"
                prepare_dirs.update({runs[i].name: shared for i in members})
    trained: dict[str, PlannedRun] = {}
    moved: dict[str, str] = {}  # workdir of a run that does not train -> the one that does
    out = []
    for run, c in zip(runs, resolved):
        overrides = {
            key: moved.get(value, value) if isinstance(value, str) else value
            for key, value in run.overrides.items()
        }
        commands = run.commands
        if run.name in prepare_dirs:
            overrides["data.prepare_dir"] = prepare_dirs[run.name]
        if "train" in commands:
            key = training_inputs(c)
            if key in trained:
                same = trained[key]
                commands = tuple(cmd for cmd in commands if cmd != "train")
                moved[run.workdir] = same.workdir
                if "eval" in commands:
                    overrides.setdefault("eval.checkpoint_workdir", same.workdir)
                notes[run.name] = f"trains the same model as {same.name}: not trained again"
            else:
                trained[key] = run
        out.append(dataclasses.replace(run, overrides=overrides, commands=commands))
    return out, notes


def format_value(value: Any) -> str:
    """A value as `--config.KEY=` text that ml_collections parses back to the same value."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return repr(tuple(value))
    return repr(value)


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    return [f"--config.{key}={format_value(value)}" for key, value in overrides.items()]


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted-key overrides; a missing key or a wrong type is an error."""
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in overrides.items():
        *sections, field = key.split(".")
        node = config
        for section in sections:
            if section not in node or not isinstance(node[section], ml_collections.ConfigDict):
                raise RetroError(f"sweep override {key!r}: the config has no section {section!r}")
            node = node[section]
        if field not in node:
            raise RetroError(f"sweep override {key!r}: the config has no key {field!r}")
        try:
            node[field] = tuple(value) if isinstance(node[field], tuple) else value
        except TypeError as e:
            raise RetroError(f"sweep override {key}={value!r}: {e}") from None
    return config


def command_lines(
    run: PlannedRun, config_spec: str, base_overrides: Mapping[str, Any], launcher: str
) -> list[list[str]]:
    """The argv of every command of a run.

    local: `retro-jax CMD --config=... --workdir=... --config.KEY=VALUE ...`;
    tpu: `env WAIT=1 RUN_NAME={run}-{CMD} tpu/run.sh CMD ...` (in the foreground, one log per
    command on the workers).
    """
    args = [f"--config={config_spec}", f"--workdir={run.workdir}"]
    args += override_args({**base_overrides, **run.overrides})
    if launcher == "tpu":
        run_sh = str(REPO / "tpu" / "run.sh")
        return [
            ["env", "WAIT=1", f"RUN_NAME={run.name}-{command}", run_sh, command, *args]
            for command in run.commands
        ]
    # `retro-jax` when it is on PATH (as after `pip install`), else this Python's module.
    program = (
        ["retro-jax"] if shutil.which("retro-jax") else [sys.executable, "-m", "retro_jax.cli"]
    )
    return [[*program, command, *args] for command in run.commands]


def _repo_relative(path: str) -> str:
    """TPU workers run from the synced copy of this repository: config paths must lie in it."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(REPO))
    except ValueError:
        raise RetroError(
            f"--launcher=tpu: config file {path} is not inside the repository {REPO}, "
            "so the TPU workers do not have it (tpu/setup.sh syncs the repository)"
        ) from None


def _read_status(workdir: str) -> dict[str, str]:
    from etils import epath  # noqa: PLC0415 (gs:// support, only when a sweep really runs)

    path = epath.Path(workdir) / "sweep.json"
    if not path.exists():
        return {}
    return {r["name"]: r["status"] for r in json.loads(path.read_text())["runs"]}


def _write_status(workdir: str, config_spec: str, runs: list[PlannedRun], status: dict) -> None:
    from etils import epath  # noqa: PLC0415

    root = epath.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    record = {
        "config": config_spec,
        "runs": [
            {
                "name": r.name,
                "workdir": r.workdir,
                "overrides": {k: format_value(v) for k, v in r.overrides.items()},
                "commands": list(r.commands),
                "status": status.get(r.name, "pending"),
            }
            for r in runs
        ],
    }
    tmp = root / "sweep.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(root / "sweep.json")


def run_sweep(
    config: ml_collections.ConfigDict,
    config_spec: str,
    workdir: str | None,
    *,
    selected: Sequence[str] = (),
    base_overrides: Mapping[str, Any] | None = None,
    dry_run: bool = False,
    launcher: str = "local",
    execute=subprocess.run,
) -> list[PlannedRun]:
    """Expand, check and list or run a sweep. `execute(argv)` runs one command (for tests)."""
    base_overrides = dict(base_overrides or {})
    if launcher not in ("local", "tpu"):
        raise RetroError(f"--launcher must be local or tpu, got {launcher!r}")
    if not workdir and not dry_run:
        raise RetroError("sweep: --workdir is required (each run gets a folder under it)")
    if launcher == "tpu":
        path, sep, arg = config_spec.partition(":")
        config_spec = _repo_relative(path) + sep + arg
        if workdir and not workdir.startswith("gs://") and not dry_run:
            raise RetroError(f"--launcher=tpu: --workdir must be gs://..., got {workdir!r}")
    root = workdir or "WORKDIR"
    runs = expand(load_sweeps(config_spec), root, selected)
    for run in runs:  # every override must name a key of the config, before anything starts
        apply_overrides(config, run.overrides)
    runs, notes = share_work(config, runs, root)

    status = {} if dry_run else _read_status(root)
    print(f"sweep of {config_spec}: {len(runs)} runs under {root}")
    for run in runs:
        changes = " ".join(f"{k}={format_value(v)}" for k, v in run.overrides.items())
        print(f"  {run.name:<28} {status.get(run.name, 'pending'):<8} {changes or '(defaults)'}")
        if run.name in notes:
            print(f"      ({notes[run.name]})")
        if dry_run:
            for argv in command_lines(run, config_spec, base_overrides, launcher):
                print("      " + shlex.join(argv))
    if dry_run:
        return runs

    _write_status(root, config_spec, runs, status)
    for run in runs:
        if status.get(run.name) == "done":
            continue
        print(f"== {run.name}", flush=True)
        status[run.name] = "running"
        _write_status(root, config_spec, runs, status)
        for argv in command_lines(run, config_spec, base_overrides, launcher):
            print("$ " + shlex.join(argv), flush=True)
            if execute(argv).returncode != 0:
                status[run.name] = "failed"
                _write_status(root, config_spec, runs, status)
                raise RetroError(f"sweep run {run.name}: `{shlex.join(argv)}` failed")
        status[run.name] = "done"
        _write_status(root, config_spec, runs, status)
    return runs


def main(config: ml_collections.ConfigDict, workdir: str | None) -> None:
    """`retro-jax sweep`: reads --dry_run, --sweep and --launcher from the command line."""
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    FLAGS = flags.FLAGS
    run_sweep(
        config,
        config_flags.get_config_filename(FLAGS["config"]),
        workdir,
        selected=[s for s in (FLAGS.sweep or "").split(",") if s],
        base_overrides=config_flags.get_override_values(FLAGS["config"]),
        dry_run=FLAGS.dry_run,
        launcher=FLAGS.launcher,
    )
