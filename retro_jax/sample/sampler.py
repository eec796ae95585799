"""The sampler: a RETRO checkpoint decoding one or several prompts with live retrieval.

Decoding is incremental (retro_jax/model/decode.py): the prompt in one call (prefill), then one
position per step, self-attention keys and values cached, each chunk's neighbours encoded once.
Several prompts decode together, one row each (`generate_batch`). When chunk C_u is complete (its
last token is fed), `LiveRetriever` finds its neighbours and that very step encodes them; they
condition the generation of chunk u+1 from the last token of C_u on. The prompt starts with EOS
(documents do, see docs/prepare.md) and is left-padded so that generation starts on a chunk
boundary and the first generated token already sees the neighbours of the prompt's last chunk.
`Sampler.from_workdir` loads the checkpoint, tokenizer, BERT, index and database of a workdir.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.config import prepare_dir as prepare_dir_of
from retro_jax.data import files
from retro_jax.errors import RetroError
from retro_jax.model.decode import Decoder
from retro_jax.sample.live import LiveRetriever, RetrievedChunk, copied_tokens
from retro_jax.sample.tokens import sample_tokens


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
    from retro_jax.model.load import find_checkpoints, load_model, read_meta

    if not files.isdir(workdir):
        raise RetroError(f"sample: workdir {workdir} does not exist")
    checkpoints_dir, _ = find_checkpoints(workdir)  # RetroError when there is none
    model, step = load_model(workdir, step=step, mesh=sampling_mesh(config.mesh))
    meta = read_meta(checkpoints_dir, step)
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

    from retro_jax.prepare.run import keys_embedding
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
    bert_max_len, dtype = keys_embedding(prepare_dir)  # the queries as the keys were embedded
    embedder = ChunkEmbedder.from_pretrained(
        str(config.retrieval.bert_path) or None,
        max_len=bert_max_len,
        batch_size=max(1, int(config.sample.batch_size)),  # one chunk end of every row at once
        dtype=dtype,
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
