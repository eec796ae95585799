"""`retro-jax COMMAND --help`: every command's own help (usage, description, flags, docs page),
exit code 0, nothing imported or run; help flags are never taken for Beam pipeline options.
Mistakes in the flags or the config file: one line, exit code 2."""

import os
import subprocess
import sys

import pytest

from retro_jax.cli import COMMANDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    command = [sys.executable, "-m", "retro_jax.cli", *args]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_its_help(command):
    done = _cli(command, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert out.startswith(f"usage: retro-jax {command}"), out[:300]
    assert COMMANDS[command][2] in out and "--config" in out and "--workdir" in out
    assert "more: docs/" in out or "more: README.md" in out
    page = out.rsplit("more: ", 1)[1].split()[0]
    assert os.path.exists(os.path.join(ROOT, page)), page


def test_command_flags_are_listed():
    prepare = _cli("prepare", "--help").stdout
    assert "--runner" in prepare and "Beam pipeline options" in prepare
    assert "docs/prepare.md" in prepare
    sample = _cli("sample", "--help").stdout
    assert all(f"--{f}" in sample for f in ("prompt", "max_new_tokens", "top_p", "seed"))
    assert "--launcher" not in sample
    sweep = _cli("sweep", "--help").stdout
    assert all(f"--{f}" in sweep for f in ("dry_run", "sweep", "launcher"))
    assert "--prompt" not in sweep


@pytest.mark.parametrize("flag", ["--helpfull", "--helpshort", "-h"])
def test_help_flags_are_not_beam_options(flag, tmp_path):
    """Even after --runner and Beam options, a help flag prints the help and runs nothing."""
    flags = ["--config=experiments/tiny.py", f"--workdir={tmp_path / 'w'}"]
    done = _cli("prepare", *flags, "--runner=DirectRunner", "--direct_num_workers=2", flag)
    assert done.returncode == 0 and "error" not in done.stderr, done.stderr[-2000:]
    assert "--runner" in done.stdout and not (tmp_path / "w").exists()


def test_help_imports_no_command_module():
    code = (
        "import sys\nfrom retro_jax import cli\n"
        "try:\n    cli.main(['retro-jax', 'train', '--help'])\nexcept SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'jax')]\n"
        "heavy += [m for m in sys.modules if m.startswith('retro_jax.') and m not in "
        "('retro_jax.cli', 'retro_jax.errors')]\n"
        "print('imported:', heavy, file=sys.stderr)\nassert not heavy\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: retro-jax train" in done.stdout


@pytest.mark.parametrize(
    "command, args, message",
    [
        (
            "train",
            ["--config=experiments/tiny.py", "--config.train.step=20"],
            "--config.train.step: the config has no key 'step' (did you mean \"steps\"",
        ),
        (
            "sweep",
            ["experiments/tiny.py", "--config.trian.steps=3", "--dry-run"],
            "--config.trian.steps: the config has no key 'trian' (did you mean \"train\"",
        ),
        ("train", ["--config=experiments/nope.py"], "--config: [Errno 2] No such file"),
        (
            "prepare",
            ["--config=experiments/tiny.py", "--config.train.steps=abc"],
            "--config.train.steps=abc: invalid literal for int()",
        ),
        ("eval", ["--config=experiments/tiny.py", "--steps=3"], "Unknown command line flag"),
        ("train", ["--config=experiments/retro_172m.py:bogus"], "config argument 'bogus'"),
    ],
)
def test_flag_and_config_mistakes_are_one_line(command, args, message, tmp_path):
    done = _cli(command, *args, f"--workdir={tmp_path}")
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"retro-jax {command}: error: {message}"), line
    assert os.listdir(tmp_path) == []
