"""`retro-jax sample`: generate text with RETRO, retrieving from the chunk database as it goes.

The command (`main`): one prompt (`--prompt`) printed with what it retrieved, or a file of prompts
(`--prompts`, `read_prompts`, all checked first: `check_prompts`) decoded in batches, written as
JSON lines (`--output`, `write_samples`: resumable batch by batch). See docs/sample.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

from tqdm.auto import tqdm

from retro_jax.data import files
from retro_jax.errors import RetroError
from retro_jax.sample.live import format_neighbours
from retro_jax.sample.sampler import Sampler, SampleResult


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
