"""A tiny prepared workdir with a checkpoint, shared by the eval and sample tests.

Built once per test process (both test modules call `tiny_workdir`): `run_prepare` on eight State
of the Union paragraphs (one training document repeats half of an evaluation paragraph, so some
evaluation chunks overlap their neighbours) with the real MiniLM BERT, then a randomly initialised
RETRO saved with the train package's checkpoint code (training is t-train's to test; here only
the wiring from checkpoint to logits matters). A baseline twin's checkpoint sits in a second
workdir.
"""

from __future__ import annotations

import os

from model_configs import TWO_LAYERS

from retro_jax.config import default_config, model_config, model_config_dict
from retro_jax.data.sources import sotu_speeches

SMALL_MODEL = dict(TWO_LAYERS, vocab_size=320, chunk_size=16)

_BUILT: dict[str, tuple[str, str, str]] = {}


def small_config(root: str):
    c = default_config()
    c.model = model_config_dict("tiny", **SMALL_MODEL)
    c.data.train_source = os.path.join(root, "train", "*.txt")
    c.data.eval_source = os.path.join(root, "eval", "*.txt")
    c.data.vocab_size = 320
    c.data.seq_len = 64
    c.data.num_neighbours_stored = 4
    c.data.chunks_per_shard = 64
    c.data.records_per_shard = 8
    c.retrieval.embed_batch_size = 32
    c.eval.batch_size = 8
    c.eval.num_neighbours = 2
    c.sample.num_neighbours = 2
    return c


def _corpus(root: str) -> None:
    paragraphs = [
        p
        for path, _ in sotu_speeches()[200:206]
        for p in open(path, encoding="utf-8").read().split("\n")
        if 60 < len(p.split()) < 120
    ]
    os.makedirs(os.path.join(root, "train"), exist_ok=True)
    os.makedirs(os.path.join(root, "eval"), exist_ok=True)
    for i, text in enumerate(paragraphs[:6]):
        with open(os.path.join(root, "train", f"t{i}.txt"), "w") as f:
            f.write(text)
    for i, text in enumerate(paragraphs[6:8]):
        with open(os.path.join(root, "eval", f"e{i}.txt"), "w") as f:
            f.write(text)
    half = paragraphs[6][: len(paragraphs[6]) // 2]  # below the leakage filter's threshold
    with open(os.path.join(root, "train", "t6.txt"), "w") as f:
        f.write(paragraphs[0] + " " + half)


def save_random_checkpoint(config, workdir: str, *, seed: int = 0, vocab: int | None = None):
    """A freshly initialised model saved as W/checkpoints/0 with the train package's code."""
    from retro_jax.model.create import create_model
    from retro_jax.train.checkpoint import Checkpoints, write_model_config
    from retro_jax.train.state import init_state
    from retro_jax.train.step import make_optimizer

    model_cfg = model_config(config)
    tx, _ = make_optimizer(config.train)
    _, state, _ = init_state(create_model(model_cfg, seed=seed), tx)
    directory = os.path.join(workdir, "checkpoints")
    meta = {
        "model": model_cfg.to_dict(),
        "data": {
            "seq_len": int(config.data.seq_len),
            "chunk_size": model_cfg.chunk_size,
            "vocab_size": int(vocab or config.data.vocab_size),
            "global_batch": int(config.train.batch_size),
            "shuffle_seed": 0,
        },
        "train": {"retrofit_from": ""},
        "position": 0,
    }
    manager = Checkpoints(directory, asynchronous=False)
    manager.save(state, meta)
    manager.close()
    write_model_config(directory, model_cfg)


def tiny_workdir(base: str) -> tuple[str, str, str]:
    """(corpus root, RETRO workdir, baseline workdir), built on the first call."""
    if "w" not in _BUILT:
        from retro_jax.prepare.run import run_prepare

        root = os.path.join(base, "eval_sample_corpus")
        workdir = os.path.join(base, "eval_sample_workdir")
        baseline = os.path.join(base, "eval_sample_baseline")
        _corpus(root)
        config = small_config(root)
        run_prepare(config, workdir, progress=False)
        save_random_checkpoint(config, workdir)
        config.model = model_config_dict("tiny", **{**SMALL_MODEL, "cca_layers": ()})
        save_random_checkpoint(config, baseline, seed=1)
        _BUILT["w"] = (root, workdir, baseline)
    return _BUILT["w"]
