"""Small corpora and configs for the prepare tests: State of the Union paragraphs as files."""

import importlib.util
import os
import subprocess
import sys

from retro_jax.data.sources import sotu_speeches
from retro_jax.prepare.run import KILL_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """
from retro_jax.config import default_config

def get_config():
    c = default_config()
    c.data.train_source = {train!r}
    c.data.eval_source = {eval!r}
    c.data.vocab_size = 320
    c.data.seq_len = 64
    c.model.chunk_size = 16
    c.data.num_neighbours_stored = 2
    c.data.chunks_per_shard = 48
    c.data.records_per_shard = 8
    c.retrieval.embed_batch_size = 32
{extra}    return c
"""


def sotu_paragraphs(first: int, last: int) -> list[str]:
    """Paragraphs of 60-120 words of addresses first..last (oldest first)."""
    return [
        p
        for path, _ in sotu_speeches()[first:last]
        for p in open(path).read().split("\n")
        if 60 < len(p.split()) < 120
    ]


def write_config(path, train: str, evaluation: str, extra: str = "") -> None:
    """A config file over the given source globs; `extra` lines (indented 4) set more keys."""
    path.write_text(CONFIG.format(train=train, eval=evaluation, extra=extra))


def load_config(path):
    """get_config() of a config file."""
    spec = importlib.util.spec_from_file_location(f"config_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def prepare_cli(config_path, workdir, *flags, kill: str = "", timeout: int = 600):
    """`retro-jax prepare` in a child process; `kill="STAGE:N"` SIGKILLs it after N new shards of
    STAGE (see retro_jax.prepare.run.KILL_ENV)."""
    env = dict(os.environ, PYTHONPATH=ROOT, **{KILL_ENV: kill})
    command = [sys.executable, "-m", "retro_jax.cli", "prepare", f"--config={config_path}"]
    command += [f"--workdir={workdir}", *flags]
    return subprocess.run(
        command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
