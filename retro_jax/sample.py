"""`retro-jax sample`: generate text with RETRO, retrieving from the chunk database as it goes.

Decoding is incremental (retro_jax/model/decode.py): the prompt in one call (prefill), then one
position per step, self-attention keys and values cached, each chunk's neighbours encoded once.
Several prompts decode together, one row each (`generate_batch`, `--prompts`). Retrieval is live
and in the paper's order: when chunk C_u is complete (its last token is fed), its text is
embedded with the same frozen BERT that keyed the database, the saved index is searched, the
neighbours' chunk + continuation tokens are read from the database, and that very step encodes
them; they condition the generation of chunk u+1 from the last token of C_u on. The prompt starts
with EOS (documents do, see docs/prepare.md) and is left-padded so that generation starts on a
chunk boundary and the first generated token already sees the neighbours of the prompt's last
chunk.

Python:
    sampler = Sampler.from_workdir(config, workdir)
    result = sampler.generate("The state of the Union", max_new_tokens=64, seed=0)
    result.text, result.tokens, result.chunks   # chunks: per chunk its retrieved neighbours,
                                                # their documents and what was copied from them
    results = sampler.generate_batch(["We the people", "Tonight"], max_new_tokens=64)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import textwrap
import time
from itertools import zip_longest

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from retro_jax.config import prepare_dir as prepare_dir_of
from retro_jax.data import files
from retro_jax.errors import RetroError
from retro_jax.leakage import longest_common_run
from retro_jax.model.decode import Decoder
from retro_jax.retrieval.align import pick_neighbours

# ---------------------------------------------------------------- choosing the next token


def _order_keys(x: jax.Array) -> jax.Array:
    """float32 -> int32 in the same order (-0.0 taken as 0.0): the floats' bits, negative ones
    with their magnitude bits flipped."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def nucleus_mask(logits: jax.Array, top_p: jax.Array, top_k: jax.Array | int = 0) -> jax.Array:
    """bool [B, V]: the smallest set of most likely tokens whose probability reaches top_p, cut
    to the top_k most likely (tokens tied with the k-th stay; top_k <= 0: no cut).

    The most likely token is always kept; top_p >= 1 and top_k <= 0 keep every token. Each cut is
    a threshold on the logits, the largest that still keeps top_p of the mass (or k tokens),
    found by bisection on the logits' 32-bit order keys: 32 passes over the vocabulary instead
    of sorting it, which XLA:CPU does slowly (12-18x faster at a 128k vocabulary on CPU;
    `tests/test_sample.py` checks it against the sorted cumulative sum).
    """
    keys = _order_keys(logits)
    probs = jax.nn.softmax(logits, axis=-1)
    lowest, highest = jnp.min(keys, axis=-1), jnp.max(keys, axis=-1)

    def body(_, bounds):  # (nucleus, top-k) thresholds [2, B]: lo keeps enough, hi does not
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        kept = keys[None] >= mid[..., None]
        mass = jnp.sum(jnp.where(kept[0], probs, 0.0), axis=-1)
        enough = jnp.stack([mass >= top_p, jnp.sum(kept[1], axis=-1) >= top_k])
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    start = (jnp.stack([lowest, lowest]), jnp.stack([highest, highest]) + 1)
    (nucleus, top), _ = jax.lax.fori_loop(0, 32, body, start)
    nucleus = jnp.where(top_p >= 1.0, lowest, nucleus)
    top = jnp.where(top_k <= 0, lowest, top)
    return keys >= jnp.maximum(nucleus, top)[:, None]


@jax.jit
def sample_tokens(
    logits: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    vocab_size: jax.Array | None = None,
    top_k: jax.Array | int = 0,
) -> jax.Array:
    """logits f32 [B, V] -> token ids int32 [B]: nucleus (and top-k) sampling at a temperature.

    temperature <= 0 is greedy (argmax). Ids at or past `vocab_size` (the tokenizer's; the
    model's output layer may be larger) are never drawn. temperature, top_p, vocab_size and
    top_k are traced: changing them does not recompile.
    """
    if vocab_size is not None:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)

    def draw(logits):
        scaled = logits / jnp.maximum(temperature, 1e-6)
        cut = lambda: jnp.where(nucleus_mask(logits, top_p, top_k), scaled, -jnp.inf)
        # The cut costs 32 passes over the vocabulary: skipped when it would keep every token.
        every = (top_p >= 1.0) & (top_k <= 0)
        scaled = jax.lax.cond(every, lambda: scaled, cut)
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

    greedy = lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.lax.cond(temperature > 0, draw, greedy, logits)  # only the branch taken runs


# ---------------------------------------------------------------- live retrieval


# A generated chunk that shares a run of at least this many tokens with one of the neighbours it
# was conditioned on is shown as copied from it (format_neighbours' `min_copied`).
MIN_COPIED = 8


@dataclasses.dataclass
class RetrievedChunk:
    """One complete chunk of the sequence and what it retrieved (it conditions chunk + 1)."""

    chunk: int  # index of the chunk in the (padded) sequence
    text: str  # the chunk's text: the query
    source: str  # "prompt", "generated" or "prompt+generated"
    ids: np.ndarray  # int64 [k] database chunk ids, -1 where missing
    distances: np.ndarray  # float32 [k] squared L2 between the keys
    tokens: np.ndarray  # int32 [k, 2m] the neighbours as the encoder sees them
    neighbour_texts: list[str]  # each neighbour's chunk text
    continuation_texts: list[str]  # each neighbour's continuation text
    # Each neighbour's source document, by key (ChunkDatabase.document_key: "doc <id>" for a
    # database built without doc_keys.json; "" where no neighbour); None: not recorded.
    documents: list[str] | None = None
    # Per neighbour: the longest run of consecutive generated tokens of the next chunk (the one
    # these neighbours condition; after the last chunk, what was generated after it) that its
    # entry (chunk + continuation, as the encoder saw it) also holds (`copied_tokens`); None:
    # not recorded.
    copied: list[int] | None = None

    def to_json(self) -> dict:
        """The chunk and, per neighbour, its id, distance, texts, document and copied run (id -1:
        none; no tokens)."""
        rows = []
        for j, (i, d, t, c) in enumerate(
            zip(self.ids, self.distances, self.neighbour_texts, self.continuation_texts)
        ):
            row = {
                "id": int(i),
                "distance": float(d) if i >= 0 else None,
                "text": t,
                "continuation": c,
            }
            if self.documents is not None:
                row["document"] = self.documents[j]
            if self.copied is not None:
                row["copied"] = int(self.copied[j])
            rows.append(row)
        return {
            "chunk": int(self.chunk),
            "source": self.source,
            "text": self.text,
            "neighbours": rows,
        }

    @classmethod
    def from_json(cls, value: dict) -> RetrievedChunk:
        """The inverse of to_json (tokens: None; documents / copied None when not stored, as in
        files written before they were)."""
        rows = value["neighbours"]
        has = lambda name: bool(rows) and all(name in n for n in rows)
        return cls(
            chunk=value["chunk"],
            text=value["text"],
            source=value["source"],
            ids=np.array([n["id"] for n in rows], np.int64),
            distances=np.array([np.inf if n["distance"] is None else n["distance"] for n in rows]),
            tokens=None,
            neighbour_texts=[n["text"] for n in rows],
            continuation_texts=[n["continuation"] for n in rows],
            documents=[n["document"] for n in rows] if has("document") else None,
            copied=[int(n["copied"]) for n in rows] if has("copied") else None,
        )


def copied_tokens(generated: np.ndarray, entries: np.ndarray, pad_id: int) -> np.ndarray:
    """generated int [g] (tokens generated while some neighbours conditioned them), entries int
    [k, 2m] (those neighbours: chunk + continuation) -> int32 [k]: the longest run of
    consecutive tokens of `generated` that each entry also holds (leakage's s(C), one run per
    neighbour; a run may go on from the chunk into its continuation). Padding never matches."""
    entries = np.asarray(entries)
    generated = np.asarray(generated).reshape(-1)
    if entries.ndim != 2 or not len(entries) or not len(generated):
        return np.zeros(len(entries), np.int32)
    ours = np.where(generated == pad_id, -1, generated).astype(np.int64)
    theirs = np.where(entries == pad_id, -2, entries).astype(np.int64)
    return longest_common_run(np.broadcast_to(ours, (len(theirs), len(ours))), theirs)


class LiveRetriever:
    """A chunk's tokens [m] -> its k nearest database entries (chunk + continuation) [k, 2m]."""

    def __init__(
        self,
        tokenizer,
        embedder,
        index,
        database,
        num_neighbours: int,
        *,
        continuation=True,
        align=False,
        rerank=0,
    ):
        self.tokenizer, self.embedder, self.index = tokenizer, embedder, index
        self.database, self.k = database, int(num_neighbours)
        # as prepare aligned and ranked the records (retrieval.align_neighbours, .rerank)
        self.align, self.rerank = bool(align), int(rerank)
        # False: the continuation half of each entry is padding, as the model was trained
        # (data.neighbour_continuation, the paper's ablation).
        self.continuation = bool(continuation)
        self.seconds = {"embed": 0.0, "search": 0.0, "lookup": 0.0}
        self.queries = 0

    def __call__(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (entries int32 [k, 2m], ids int64 [k], distances float32 [k])."""
        entries, ids, distances = self.batch(np.asarray(chunk)[None])
        return entries[0], ids[0], distances[0]

    def batch(self, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """chunks [N, m] -> (entries int32 [N, k, 2m], ids int64 [N, k], distances float32
        [N, k]): one BERT call and one search for all N.

        A chunk without text (only padding and EOS) retrieves nothing, as in prepare."""
        chunks = np.asarray(chunks)
        count, m = chunks.shape
        text = ((chunks != self.tokenizer.pad_id) & (chunks != self.tokenizer.eos_id)).any(1)
        wanted = max(self.k, self.rerank)  # candidates searched
        ids = np.full((count, wanted), -1, np.int64)
        distances = np.full((count, wanted), np.inf, np.float32)
        start = embedded = searched = time.perf_counter()
        if text.any():
            queries = [self.tokenizer.decode(chunk) for chunk in chunks[text]]
            keys = self.embedder.embed(queries, progress=False)  # [Q, D]
            embedded = time.perf_counter()
            ids[text], distances[text] = self.index.search(keys, wanted)
            searched = time.perf_counter()
            self.queries += len(queries)
        ids, entries, order = pick_neighbours(  # [N, k], [N, k, 2m], [N, k]
            self.database, ids, chunks, self.k, align=self.align, by_overlap=bool(self.rerank)
        )
        distances = np.take_along_axis(distances, order, axis=1)
        if not self.continuation:
            entries[..., m:] = self.tokenizer.pad_id
        done = time.perf_counter()
        self.seconds["embed"] += embedded - start
        self.seconds["search"] += searched - embedded
        self.seconds["lookup"] += done - searched
        return entries, ids, distances


# ---------------------------------------------------------------- the sampler


@dataclasses.dataclass
class SampleResult:
    prompt: str
    text: str  # the generated continuation (without the prompt)
    tokens: np.ndarray  # int32 [T] generated token ids
    prompt_tokens: np.ndarray  # int32 [P] the prompt as fed: EOS + its tokens (no padding)
    padding: int  # pad tokens put before the prompt
    chunks: list[RetrievedChunk]  # every chunk that was complete and fed, in order
    stopped: str  # "eos", "max_new_tokens" or "max_len"
    seconds: dict  # prefill (the prompt), decode (the steps after it), embed, search, lookup
    sequence: np.ndarray  # int32 [padding + P + T]: padding, prompt and generated tokens
    logits: np.ndarray | None = None  # f32 [fed, V] with keep_logits=True: after each fed token


class Sampler:
    """Generation with a RETRO checkpoint, its tokenizer and (unless a baseline) live retrieval."""

    def __init__(
        self,
        model,
        tokenizer,
        retriever: LiveRetriever | None = None,
        *,
        max_len: int,
        pad_prompt: bool = True,
        stop_at_eos: bool = True,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 0.9,
        top_k: int = 0,
    ):
        self.model, self.tokenizer, self.retriever = model, tokenizer, retriever
        self.config = model.config
        self.decoder = Decoder(model)
        self.max_len = int(max_len)
        self.pad_prompt, self.stop_at_eos = bool(pad_prompt), bool(stop_at_eos)
        self.defaults = dict(
            max_new_tokens=int(max_new_tokens),
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
        )
        self.retrieval = retriever is not None and not self.config.is_baseline
        self.checkpoint = None  # from_workdir: which checkpoint (recorded by write_samples)

    @classmethod
    def from_workdir(cls, config, workdir: str, *, step: int | None = None) -> Sampler:
        """The latest (or `step`) checkpoint of W/checkpoints, with W/prepare's tokenizer, BERT,
        index and chunk database; settings from config.sample and config.retrieval."""
        model, tokenizer, retriever, max_len, step = load_parts(config, workdir, step=step)
        s = config.sample
        sampler = cls(
            model,
            tokenizer,
            retriever,
            max_len=max_len,
            pad_prompt=bool(s.pad_prompt),
            stop_at_eos=bool(s.stop_at_eos),
            max_new_tokens=int(s.max_new_tokens),
            temperature=float(s.temperature),
            top_p=float(s.top_p),
            top_k=int(s.top_k),
        )
        sampler.checkpoint = f"{workdir}, step {step}"
        return sampler

    # ------------------------------------------------------------------ prompt and cache

    def prompt_tokens(self, prompt: str) -> tuple[np.ndarray, int]:
        """(EOS + the prompt's tokens int32 [P], left padding) after the length checks."""
        if not prompt or not prompt.strip():
            raise RetroError("sample: the prompt is empty (--prompt TEXT)")
        ids = self.tokenizer.encode(prompt)
        if len(ids) == 0:
            raise RetroError(f"sample: the prompt {prompt!r} encodes to no tokens")
        ids = np.concatenate([[self.tokenizer.eos_id], ids]).astype(np.int32)
        m = self.config.chunk_size
        padding = (-len(ids)) % m if self.pad_prompt else 0
        if len(ids) + padding >= self.max_len:
            raise RetroError(
                f"sample: the prompt is {len(ids)} tokens (+{padding} padding), too long for the "
                f"model's maximum length {self.max_len} (data.seq_len / sample.max_len); "
                "shorten the prompt"
            )
        return ids, padding

    def _cache_len(self, needed: int) -> int:
        """Positions to cache: whole chunks, a power of two of them (few compiled shapes), at
        most the maximum length."""
        m = self.config.chunk_size
        chunks = -(-needed // m)
        most = -(-self.max_len // m)
        return min(1 << (chunks - 1).bit_length(), most) * m

    def options(self, **given) -> dict:
        """The sampling options (max_new_tokens, temperature, top_p, top_k), None or left out
        taking the sampler's defaults, checked."""
        o = {
            name: value if given.get(name) is None else given[name]
            for name, value in self.defaults.items()
        }
        if o["max_new_tokens"] < 1:
            raise RetroError(
                f"sample: --max-new-tokens must be at least 1, got {o['max_new_tokens']}"
            )
        if not 0.0 < o["top_p"] <= 1.0:
            raise RetroError(f"sample: --top-p must be in (0, 1], got {o['top_p']}")
        if o["temperature"] < 0:
            raise RetroError(f"sample: --temperature must be >= 0, got {o['temperature']}")
        if o["top_k"] < 0:
            raise RetroError(f"sample: --top-k must be >= 0 (0: no cut), got {o['top_k']}")
        return o

    # ------------------------------------------------------------------ generation

    def generate(self, prompt: str, **options) -> SampleResult:
        """Continue `prompt`; options as `generate_batch`'s (None takes config.sample's)."""
        return self.generate_batch([prompt], **options)[0]

    def generate_batch(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int = 0,
        keep_logits: bool = False,
    ) -> list[SampleResult]:
        """Continue every prompt at once, one row each; None takes the sampler's defaults.

        The prompts are left-padded to one end (a chunk boundary with `pad_prompt`), fed in one
        prefill call, then every row takes one step per new token: a row stops at its EOS (it
        is fed padding after, and retrieves nothing), the batch when every row has stopped or
        at `max_new_tokens`. The live retrieval of each chunk end is one BERT call and one
        search for all rows. `seconds` is the whole batch's."""
        o = self.options(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k
        )
        max_new, temperature, top_p, top_k = (
            o[name] for name in ("max_new_tokens", "temperature", "top_p", "top_k")
        )
        if not prompts:
            raise RetroError("sample: no prompt to continue")
        c, tok = self.config, self.tokenizer
        m, rows = c.chunk_size, len(prompts)
        encoded = [self.prompt_tokens(prompt) for prompt in prompts]  # (ids, own padding)
        prompt_ids = [ids for ids, _ in encoded]
        fed = max(len(ids) + own for ids, own in encoded)  # every prompt ends here
        padding = [fed - len(ids) for ids in prompt_ids]
        stopped = ["max_new_tokens"] * rows
        if fed + max_new > self.max_len:
            max_new, stopped = self.max_len - fed, ["max_len"] * rows
        sequence = np.full((rows, fed + max_new), c.pad_id, np.int32)
        for row, ids in enumerate(prompt_ids):
            sequence[row, padding[row] : fed] = ids
        k = self.retriever.k if self.retrieval else 1
        cache_len = self._cache_len(fed + max_new)
        cache = self.decoder.init_cache(rows, cache_len, k)
        key = jax.random.key(seed)
        temperature_arr = jnp.float32(temperature)
        top_p_arr, top_k_arr = jnp.float32(top_p), jnp.int32(top_k)
        vocab_arr = jnp.int32(tok.vocab_size)
        generated = [0] * rows
        active = list(range(rows))
        chunks: list[list[RetrievedChunk]] = [[] for _ in range(rows)]
        retrieval_before = dict(self.retriever.seconds) if self.retrieval else {}
        start = time.perf_counter()

        def retrieve(pairs: list[tuple[int, int]], into: np.ndarray, first: int = 0) -> None:
            """The neighbours of chunk u of each (row, u), one retrieval for all, into
            `into[row, u - first]` and the row's chunks; chunks of padding only are left out."""
            pairs = [(row, u) for row, u in pairs if (u + 1) * m > padding[row]]
            if not pairs:
                return
            texts = np.stack([sequence[row, u * m : (u + 1) * m] for row, u in pairs])
            entries, ids, distances = self.retriever.batch(texts)
            for (row, u), text, e, i, d in zip(pairs, texts, entries, ids, distances):
                into[row, u - first] = e
                chunks[row].append(self._describe(u, text, u * m, fed, e, i, d))

        # The prompts in one call (prefill), its shape bucketed to a power of two of chunks (few
        # compilations): filler pad tokens after them, pad neighbours for the chunks they do not
        # complete; neither is seen by the prompts' positions, and decoding overwrites them.
        width = min(self._cache_len(fed), cache_len)
        tokens = np.full((rows, width), c.pad_id, np.int32)
        tokens[:, :fed] = sequence[:, :fed]
        neighbours = None
        if self.retrieval:
            neighbours = np.full((rows, width // m, k, 2 * m), c.pad_id, np.int32)
            retrieve([(row, u) for u in range(fed // m) for row in range(rows)], neighbours)
        prefill_start = time.perf_counter()
        logits, cache = self.decoder.prefill(
            cache, tokens, neighbours, length=fed, all_logits=keep_logits
        )
        jax.block_until_ready(logits)
        prefill_s = time.perf_counter() - prefill_start
        logits_seen = [np.asarray(logits[:, :fed])] if keep_logits else []
        logits = logits[:, fed - 1] if keep_logits else logits
        t = fed  # the position of the token drawn next
        while True:
            key, draw = jax.random.split(key)
            drawn = sample_tokens(logits, draw, temperature_arr, top_p_arr, vocab_arr, top_k_arr)
            drawn = np.asarray(drawn)
            for row in active:
                sequence[row, t] = drawn[row]
                generated[row] += 1
            if self.stop_at_eos:
                for row in [row for row in active if drawn[row] == tok.eos_id]:
                    stopped[row] = "eos"
                    active.remove(row)
            if not active or t + 1 == fed + max_new:
                break
            chunk = None
            if self.retrieval and (t + 1) % m == 0:
                chunk = np.full((rows, 1, k, 2 * m), c.pad_id, np.int32)
                retrieve([(row, t // m) for row in active], chunk, first=t // m)
                chunk = chunk[:, 0]
            # A row that has stopped is fed its EOS, then padding, and retrieves nothing.
            logits, cache = self.decoder.step(cache, jnp.asarray(sequence[:, t]), chunk)
            if keep_logits:
                logits_seen.append(np.asarray(logits)[:, None])
            t += 1
        seconds = {"prefill": prefill_s, "decode": time.perf_counter() - start - prefill_s}
        if self.retrieval:
            for name, value in self.retriever.seconds.items():
                seconds[name] = value - retrieval_before[name]
            seconds["decode"] -= sum(seconds[name] for name in retrieval_before)
        logits_all = np.concatenate(logits_seen, axis=1) if keep_logits else None
        results = []
        for row, prompt in enumerate(prompts):
            end = fed + generated[row]
            new = sequence[row, fed:end]
            self._record_copies(chunks[row], sequence[row, :end], fed)
            results.append(
                SampleResult(
                    prompt=prompt,
                    text=tok.decode(new),
                    tokens=new.copy(),
                    prompt_tokens=prompt_ids[row],
                    padding=padding[row],
                    sequence=sequence[row, :end].copy(),
                    chunks=chunks[row],
                    stopped=stopped[row],
                    seconds=dict(seconds),
                    logits=None if logits_all is None else logits_all[row, : end - 1],
                )
            )
        return results

    def _describe(self, u, chunk, first, prompt_end, entries, ids, distances) -> RetrievedChunk:
        m, tok = self.config.chunk_size, self.tokenizer
        if first + m <= prompt_end:
            source = "prompt"
        elif first >= prompt_end:
            source = "generated"
        else:
            source = "prompt+generated"
        database = self.retriever.database
        doc_ids = database.doc_ids(np.asarray(ids, np.int64))
        return RetrievedChunk(
            chunk=u,
            text=tok.decode(chunk),
            source=source,
            ids=np.asarray(ids, np.int64),
            distances=np.asarray(distances, np.float32),
            tokens=np.asarray(entries, np.int32),
            neighbour_texts=[tok.decode(e[:m]) if i >= 0 else "" for e, i in zip(entries, ids)],
            continuation_texts=[tok.decode(e[m:]) if i >= 0 else "" for e, i in zip(entries, ids)],
            documents=[database.document_key(d) if d >= 0 else "" for d in doc_ids],
        )

    def _record_copies(self, chunks: list[RetrievedChunk], sequence: np.ndarray, fed: int) -> None:
        """Each chunk's `copied`: its neighbours against the tokens they conditioned, those of the
        next chunk (the last one's: what was generated after it) in `sequence` [padding + P + T],
        generated ones only (from position `fed` on)."""
        m = self.config.chunk_size
        for retrieved in chunks:
            start = max((retrieved.chunk + 1) * m, fed)
            after = sequence[start : (retrieved.chunk + 2) * m]
            retrieved.copied = copied_tokens(after, retrieved.tokens, self.config.pad_id).tolist()


# ---------------------------------------------------------------- loading a workdir


def _read_meta(checkpoints_dir: str, step: int) -> dict:
    from retro_jax.train.checkpoint import Checkpoints

    manager = Checkpoints(checkpoints_dir, asynchronous=False)
    try:
        return manager.read_meta(step)
    finally:
        manager.close()


def sampling_mesh(mesh_config) -> jax.sharding.Mesh | None:
    """The devices one sequence is decoded on: with mesh.fsdp x mesh.tensor > 1 (a model too
    large for one device), a (1, fsdp, tensor) mesh whose weights split as in training; else
    None, one device (the data axis only replicates weights, and one sequence has no batch to
    split)."""
    from retro_jax.sharding import make_mesh

    shape = make_mesh(mesh_config).shape  # checks the config against the devices
    fsdp, tensor = shape["fsdp"], shape["tensor"]
    if fsdp * tensor == 1:
        return None
    axes = {"data": 1, "fsdp": fsdp, "tensor": tensor}
    return make_mesh(axes, devices=jax.devices()[: fsdp * tensor])


def load_parts(config, workdir: str, *, step: int | None = None):
    """(model, tokenizer, LiveRetriever or None for a baseline, max_len, checkpoint step) of a
    workdir; a RetroError naming what is missing or inconsistent."""
    from retro_jax.data.tokenizer import load_tokenizer
    from retro_jax.train.checkpoint import find_checkpoints, load_model

    if not files.isdir(workdir):
        raise RetroError(f"sample: workdir {workdir} does not exist")
    checkpoints_dir, _ = find_checkpoints(workdir)  # RetroError when there is none
    model, step = load_model(workdir, step=step, mesh=sampling_mesh(config.mesh))
    meta = _read_meta(checkpoints_dir, step)
    model_cfg = model.config
    prepare_dir = prepare_dir_of(config, workdir)
    tokenizer_dir = os.path.join(prepare_dir, "tokenizer")
    if not files.exists(tokenizer_dir):
        raise RetroError(f"sample: {tokenizer_dir} missing: run `retro-jax prepare` first")
    tokenizer = load_tokenizer(tokenizer_dir, pad_id=model_cfg.pad_id)
    trained_vocab = int(meta.get("data", {}).get("vocab_size", tokenizer.vocab_size))
    if model_cfg.vocab_size < tokenizer.vocab_size or trained_vocab != tokenizer.vocab_size:
        raise RetroError(
            f"sample: the checkpoint {checkpoints_dir}/{step} (model vocab_size "
            f"{model_cfg.vocab_size}, trained on a tokenizer of {trained_vocab}) does not match "
            f"the tokenizer {tokenizer_dir} ({tokenizer.vocab_size} tokens)"
        )
    max_len = int(config.sample.max_len) or int(meta.get("data", {}).get("seq_len", 0))
    max_len = max_len or int(config.data.seq_len)
    if model_cfg.is_baseline:
        return model, tokenizer, None, max_len, step

    from retro_jax.retrieval.chunks import ChunkDatabase
    from retro_jax.retrieval.embed import ChunkEmbedder
    from retro_jax.retrieval.index import NeighbourIndex

    index_dir = os.path.join(prepare_dir, "index")
    if not files.isfile(os.path.join(index_dir, "index.json")):
        raise RetroError(f"sample: no neighbour index in {index_dir}: run `retro-jax prepare`")
    index = NeighbourIndex.load(index_dir)
    database = ChunkDatabase(os.path.join(prepare_dir, "db"), local_cache=True)
    if database.chunk_size != model_cfg.chunk_size or len(database) != len(index):
        raise RetroError(
            f"sample: the chunk database {prepare_dir}/db ({len(database)} chunks of "
            f"{database.chunk_size}) does not match the index ({len(index)} keys) and the "
            f"model (chunk_size {model_cfg.chunk_size})"
        )
    k = int(config.sample.num_neighbours)
    if k < 1:
        raise RetroError(f"sample.num_neighbours={k} must be at least 1")
    r = config.retrieval
    embedder = ChunkEmbedder.from_pretrained(
        str(r.bert_path) or None,
        max_len=_bert_max_len(prepare_dir, r),
        batch_size=max(1, int(config.sample.batch_size)),  # one chunk end of every row at once
        dtype=str(r.get("embed_dtype", "float32")),  # the queries as the keys were embedded
    )
    if index.model_id and embedder.model_id != index.model_id:
        raise RetroError(
            f"sample: retrieval.bert_path gives the BERT {embedder.model_id}, but the index "
            f"{index_dir} was built with {index.model_id}"
        )
    from retro_jax.data.pipeline import keep_continuation

    retriever = LiveRetriever(
        tokenizer,
        embedder,
        index,
        database,
        k,
        continuation=keep_continuation(config),
        align=bool(config.retrieval.get("align_neighbours", False)),
        rerank=int(config.retrieval.get("rerank", 0)),
    )
    return model, tokenizer, retriever, max_len, step


def _bert_max_len(prepare_dir: str, retrieval_config) -> int:
    """The BERT truncation length prepare used for the keys (manifest), else the config's."""
    try:
        keys = files.read_json(os.path.join(prepare_dir, "manifest.json"))["stages"]["keys"]
        return int(keys["settings"]["max_len"])
    except (OSError, KeyError, ValueError, TypeError):
        return int(retrieval_config.bert_max_len)


# ---------------------------------------------------------------- the command


def format_neighbours(
    chunks: list[RetrievedChunk], width: int = 100, min_copied: int = MIN_COPIED
) -> str:
    """Per chunk: its text on the left, the database chunks it retrieved on the right, each
    with its source document, then a line `next chunk copied N tokens from [j] DOCUMENT` for
    each neighbour the next chunk shares a run of at least `min_copied` generated tokens with
    (RetrievedChunk.copied)."""
    half = max(20, (width - 3) // 2)
    blocks = []
    for chunk in chunks:
        left = textwrap.wrap(repr(chunk.text), half) or [""]
        right, copies = [], []
        for j, (i, d, text, cont) in enumerate(
            zip(chunk.ids, chunk.distances, chunk.neighbour_texts, chunk.continuation_texts)
        ):
            if i < 0:
                right.append(f"[{j}] (none)")
                continue
            document = f"#{i}" if chunk.documents is None else chunk.documents[j]
            where = "" if chunk.documents is None else f" ({document})"
            right += textwrap.wrap(f"[{j}] #{i} d={d:.3f}{where} {text!r} + {cont!r}", half)
            if chunk.copied is not None and chunk.copied[j] >= max(1, min_copied):
                line = f"next chunk copied {chunk.copied[j]} tokens from [{j}] {document}"
                copies += textwrap.wrap(line, half)
        right += copies
        title = f"chunk {chunk.chunk} ({chunk.source})"
        lines = [f"{title:-<{half}}-+-{'retrieved (conditions the next chunk)':-<{half}}"]
        lines += [f"{a:<{half}} | {b}" for a, b in zip_longest(left, right, fillvalue="")]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def read_prompts(path: str) -> list[str]:
    """The prompts of a file: one per line (blank lines skipped), or in a .jsonl file one JSON
    object per line with a "prompt" field (prompts that span lines)."""
    if not files.isfile(path):
        raise RetroError(f"sample: --prompts {path}: no such file")
    prompts = []
    for number, line in enumerate(files.read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        if not path.endswith(".jsonl"):
            prompts.append(line)
            continue
        try:
            value = json.loads(line)
            prompt = value["prompt"]
        except (ValueError, KeyError, TypeError):
            raise RetroError(
                f'sample: {path} line {number}: not a JSON object with a "prompt" field'
            ) from None
        if not isinstance(prompt, str):
            raise RetroError(f'sample: {path} line {number}: "prompt" is not a string')
        prompts.append(prompt)
    if not prompts:
        raise RetroError(f"sample: --prompts {path} holds no prompt")
    return prompts


def check_prompts(sampler: Sampler, prompts: list[str], source: str) -> None:
    """Every prompt fits the model (Sampler.prompt_tokens), checked before any is sampled: a bad
    prompt far down a long file stops the run at once, named by its number and beginning."""
    for number, prompt in enumerate(prompts, start=1):
        try:
            sampler.prompt_tokens(prompt)
        except RetroError as e:
            why = str(e).removeprefix("sample: ")
            raise RetroError(
                f"sample: {source}, prompt {number} ({prompt[:40]!r}): {why}"
            ) from None


def result_json(result: SampleResult) -> dict:
    """One line of --output: the prompt, its continuation, why it stopped, the generated ids and
    every retrieval (RetrievedChunk.to_json)."""
    return {
        "prompt": result.prompt,
        "text": result.text,
        "stopped": result.stopped,
        "tokens": [int(i) for i in result.tokens],
        "retrieved": [chunk.to_json() for chunk in result.chunks],
    }


def _batch(sampler, prompts, number, batch_size, seed, options) -> list[SampleResult]:
    """Batch `number` of the prompts, sampled from seed + number."""
    first = number * batch_size
    return sampler.generate_batch(
        prompts[first : first + batch_size], seed=seed + number, **options
    )


def write_samples(
    sampler: Sampler,
    prompts: list[str],
    output: str,
    *,
    batch_size: int,
    seed: int,
    progress: bool = False,
    **options,
) -> tuple[list[dict], float]:
    """Continue `prompts` in batches of `batch_size` (batch i from seed + i) into the JSON lines
    file `output`, resumably: each finished batch is kept in `output`.parts/ (written whole), a
    rerun with the same prompts and settings skips those, and `output` is written whole at the
    end, with exactly an uninterrupted run's lines. `options`: generate_batch's. Returns (the
    lines as dicts, seconds spent decoding in this call)."""
    parts = output + ".parts"
    settings = {
        "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        "prompts": len(prompts),
        "batch_size": batch_size,
        "seed": seed,
        "checkpoint": sampler.checkpoint,
        **sampler.options(**options),  # as generate_batch resolves them
    }
    settings_file = os.path.join(parts, "settings.json")
    if files.exists(settings_file):
        before = files.read_json(settings_file)
        changed = sorted(k for k in settings | before if settings.get(k) != before.get(k))
        if changed:
            raise RetroError(
                f"sample: {parts} holds the batches of a run with other {', '.join(changed)}; "
                f"rerun with its settings to resume it, or delete {parts}"
            )
    else:
        files.makedirs(parts)
        files.write_json(settings_file, settings)
    rows, seconds = [], 0.0
    count = -(-len(prompts) // batch_size)
    for number in tqdm(range(count), desc="sample", unit="batch", disable=not progress):
        part = os.path.join(parts, f"batch_{number:06d}.jsonl")
        if files.exists(part):  # done by an earlier run
            rows += [json.loads(line) for line in files.read_text(part).splitlines()]
            continue
        batch = _batch(sampler, prompts, number, batch_size, seed, options)
        seconds += sum(batch[0].seconds.values())
        lines = [result_json(result) for result in batch]
        with files.atomic_write(part, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        rows += lines
    with files.atomic_write(output, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in rows)
    files.rmtree(parts)
    return rows, seconds


def main(config, workdir: str | None) -> list[dict]:
    """`retro-jax sample`: see docs/sample.md. Returns every result as its --output line."""
    from absl import flags

    FLAGS = flags.FLAGS
    if not workdir:
        raise RetroError("sample: --workdir is required (it holds prepare/ and checkpoints/)")
    if (FLAGS.prompt is None) == (FLAGS.prompts is None):
        raise RetroError("sample: give --prompt TEXT or --prompts FILE (one of them)")
    prompts = [FLAGS.prompt] if FLAGS.prompts is None else read_prompts(FLAGS.prompts)
    batch_size = int(config.sample.batch_size)
    if batch_size < 1:
        raise RetroError(f"sample.batch_size={batch_size} must be at least 1")
    sampler = Sampler.from_workdir(config, workdir)
    if FLAGS.prompts is not None:
        check_prompts(sampler, prompts, f"--prompts {FLAGS.prompts}")
    seed = int(config.seed) if FLAGS.seed is None else int(FLAGS.seed)
    options = dict(
        max_new_tokens=FLAGS.max_new_tokens,
        temperature=FLAGS.temperature,
        top_p=FLAGS.top_p,
        top_k=FLAGS.top_k,
    )
    progress = len(prompts) > batch_size and sys.stderr.isatty()
    if FLAGS.output:
        rows, seconds = write_samples(
            sampler,
            prompts,
            FLAGS.output,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
            **options,
        )
    else:
        rows, seconds = [], 0.0
        for number in range(-(-len(prompts) // batch_size)):
            batch = _batch(sampler, prompts, number, batch_size, seed, options)
            seconds += sum(batch[0].seconds.values())
            for result in batch:
                rows.append(result_json(result))
                if len(prompts) > 1:
                    print(f"=== prompt {len(rows)} of {len(prompts)} ({result.stopped})")
                if FLAGS.show_neighbours:
                    shown = format_neighbours(result.chunks)
                    print(shown or "(no chunk was completed: nothing retrieved)")
                    print()
                print(result.prompt + result.text)
    generated = sum(len(row["tokens"]) for row in rows)
    retrievals = sum(len(row["retrieved"]) for row in rows)
    stops = ", ".join(sorted({row["stopped"] for row in rows}))
    where = f", written to {FLAGS.output}" if FLAGS.output else ""
    print(
        f"\nsample: {len(rows)} prompt(s), {generated} tokens ({stops}), {retrievals} "
        f"retrievals, {generated / max(seconds, 1e-9):.1f} tokens/s{where}",
        file=sys.stderr,
    )
    return rows
