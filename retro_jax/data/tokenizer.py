"""The LM tokenizer: SentencePiece trained on the training documents, or a given one.

`Tokenizer` wraps a SentencePiece model or a Hugging Face tokenizer folder behind one interface:
`encode`, `encode_with_bytes` (ids and the UTF-8 bytes of the text each id encodes, for
bits-per-byte), `decode`, `eos_id`, `pad_id`, `vocab_size`. Trained models use identity
normalisation, no dummy prefix and byte fallback, so decode(encode(text)) == text and the byte
counts of a document's tokens sum to its UTF-8 length.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator

import numpy as np

from retro_jax.data import files
from retro_jax.errors import RetroError

SPM_FILE = "spm.model"
MAX_LINE_CHARS = 2000  # SentencePiece skips longer "sentences": longer lines are cut at spaces


def byte_counts_from_offsets(ends: np.ndarray, total: int) -> np.ndarray:
    """Bytes each token covers, from the byte offset where each token's text ends.

    Offsets that overlap or go backwards (byte-fallback pieces of one character, byte-level
    BPE) give 0 to all but one token; uncovered bytes go to the next token and the tail to the
    last, so the counts always sum to `total`. ends [T] -> counts int32 [T].
    """
    if len(ends) == 0:
        return np.zeros(0, np.int32)
    stops = np.maximum.accumulate(np.minimum(np.asarray(ends, np.int64), total))
    counts = np.diff(np.concatenate([[0], stops]))
    counts[-1] += total - stops[-1]
    return counts.astype(np.int32)


def utf8_offsets(text: str) -> np.ndarray:
    """Byte offset of every character boundary: [len(text) + 1] (character i starts at [i])."""
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (codepoints >= 0x80) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    return np.concatenate([[0], np.cumsum(widths)])


class Tokenizer:
    """SentencePiece (`kind='sentencepiece'`) or Hugging Face (`kind='huggingface'`)."""

    def __init__(self, kind: str, model, *, path: str, pad_id: int, eos_id: int, vocab_size: int):
        self.kind = kind
        self.model = model
        self.path = path
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.vocab_size = vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({self.kind}, {self.path}, vocab={self.vocab_size}, eos={self.eos_id})"

    def encode(self, text: str) -> np.ndarray:
        """int32 [T], no special tokens."""
        if self.kind == "sentencepiece":
            return np.asarray(self.model.encode(text), np.int32)
        return np.asarray(self.model(text, add_special_tokens=False)["input_ids"], np.int32)

    def encode_with_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [T], UTF-8 bytes of the text each id encodes int32 [T]); sums to the
        text's UTF-8 length."""
        total = len(text.encode("utf-8"))
        if self.kind == "sentencepiece":
            proto = self.model.encode(text, out_type="proto")
            ids = np.fromiter((p.id for p in proto.pieces), np.int32, len(proto.pieces))
            ends = np.fromiter((p.end for p in proto.pieces), np.int64, len(proto.pieces))
            return ids, byte_counts_from_offsets(ends, total)
        encoded = self.model(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(encoded["input_ids"], np.int32)
        char_ends = np.asarray([end for _, end in encoded["offset_mapping"]], np.int64)
        ends = utf8_offsets(text)[np.clip(char_ends, 0, len(text))]
        return ids, byte_counts_from_offsets(ends, total)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids, skipping pad and EOS."""
        keep = [int(i) for i in ids if i != self.pad_id and i != self.eos_id]
        if self.kind == "sentencepiece":
            return self.model.decode(keep)
        return self.model.decode(keep, skip_special_tokens=True)

    def document_tokens(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """A document as the model sees it: [EOS] + tokens + [EOS] (EOS separates documents, so
        the first real token is also predicted) and its byte counts (0 for both EOS).
        -> (ids int32 [T + 2], bytes int32 [T + 2])."""
        ids, counts = self.encode_with_bytes(text)
        eos = np.array([self.eos_id], np.int32)
        zero = np.zeros(1, np.int32)
        return np.concatenate([eos, ids, eos]), np.concatenate([zero, counts, zero])

    def fingerprint(self) -> str:
        """sha256 of the tokenizer's files (names the tokenizer in manifests)."""
        digest = hashlib.sha256()
        for name in _files_of(self.path):
            digest.update(os.path.basename(name).encode() + b"\0")
            digest.update(files.read_bytes(name))
        return digest.hexdigest()

    def save(self, directory: str) -> None:
        """Copy the tokenizer's files into `directory` (spm.model, or the HF folder's files)."""
        files.makedirs(directory)
        single = files.isfile(self.path)
        for source in _files_of(self.path):
            name = SPM_FILE if single else os.path.basename(source)
            files.copy(source, os.path.join(directory, name))


def _files_of(path: str) -> list[str]:
    """[path] for a file, else the files directly in the folder `path` (sorted)."""
    if files.isfile(path):
        return [path]
    names = sorted(os.path.join(path, name) for name in files.listdir(path))
    return [name for name in names if files.isfile(name)]


def load_tokenizer(path: str, *, pad_id: int = 0) -> Tokenizer:
    """A SentencePiece .model file, a folder holding spm.model, or a Hugging Face tokenizer
    folder (local or any tf.io.gfile scheme). `pad_id` is the id that pads records
    (config.model.pad_id)."""
    if files.isdir(path) and files.isfile(os.path.join(path, SPM_FILE)):
        path = os.path.join(path, SPM_FILE)
    if files.isfile(path):
        import sentencepiece as spm

        model = spm.SentencePieceProcessor()
        try:
            if files.is_remote(path):
                model.load_from_serialized_proto(files.read_bytes(path))
            else:
                model.load(path)
        except (OSError, RuntimeError) as e:
            raise RetroError(f"data.tokenizer={path}: not a SentencePiece model ({e})") from e
        if model.eos_id() < 0:
            raise RetroError(f"data.tokenizer={path}: the SentencePiece model has no EOS id")
        return Tokenizer(
            "sentencepiece",
            model,
            path=path,
            pad_id=pad_id,
            eos_id=int(model.eos_id()),
            vocab_size=int(model.get_piece_size()),
        )
    if files.isdir(path):
        from transformers import AutoTokenizer

        try:
            with files.local_copy(path) as local:  # (loaded whole: the copy can go)
                model = AutoTokenizer.from_pretrained(local, local_files_only=True)
        except Exception as e:  # transformers raises many types for missing/corrupt files
            raise RetroError(f"data.tokenizer={path}: cannot load tokenizer ({e})") from e
        eos = model.eos_token_id if model.eos_token_id is not None else model.sep_token_id
        if eos is None:
            raise RetroError(f"data.tokenizer={path}: the tokenizer has no EOS (or SEP) token")
        model.model_max_length = 1 << 62  # documents are longer than any model's context
        return Tokenizer(
            "huggingface", model, path=path, pad_id=pad_id, eos_id=int(eos), vocab_size=len(model)
        )
    raise RetroError(f"data.tokenizer={path}: no such file or folder")


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    """Non-empty lines of the documents, cut at spaces below MAX_LINE_CHARS."""
    for text in texts:
        for line in text.split("\n"):
            while len(line) > MAX_LINE_CHARS:
                cut = line.rfind(" ", MAX_LINE_CHARS // 2, MAX_LINE_CHARS)
                cut = cut if cut > 0 else MAX_LINE_CHARS
                yield line[:cut]
                line = line[cut:]
            if line.strip():
                yield line


def sample_lines(texts: Iterable[str], max_lines: int, seed: int = 0) -> list[str]:
    """At most max_lines training lines, a uniform sample (reservoir, seeded) if there are more;
    memory is bounded by max_lines, not by the corpus."""
    rng = np.random.default_rng(seed)
    reservoir: list[str] = []
    for seen, line in enumerate(_training_lines(texts)):
        if seen < max_lines:
            reservoir.append(line)
        else:
            slot = int(rng.integers(0, seen + 1))
            if slot < max_lines:
                reservoir[slot] = line
    return reservoir


def train_sentencepiece(
    texts: Iterable[str],
    path: str,
    *,
    vocab_size: int,
    pad_id: int = 0,
    max_lines: int = 200_000,
    seed: int = 0,
    threads: int = 2,
) -> Tokenizer:
    """Train a unigram SentencePiece model on `texts` and write it to `path` (via a temporary
    name). Byte fallback, identity normalisation, newline as one piece; pad = pad_id and the
    unknown / EOS ids take the lowest other ids."""
    import sentencepiece as spm

    lines = sample_lines(texts, max_lines, seed)
    if not lines:
        raise RetroError("tokenizer: the training documents hold no text to train on")
    specials = [i for i in range(4) if i != pad_id][:2]
    if not 0 <= pad_id < vocab_size:
        raise RetroError(f"model.pad_id={pad_id} outside data.vocab_size={vocab_size}")
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=out,
            model_type="unigram",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n"],
            pad_id=pad_id,
            unk_id=specials[0],
            eos_id=specials[1],
            bos_id=-1,
            max_sentence_length=1 << 16,
            num_threads=threads,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size too high" on a small corpus
        raise RetroError(
            f"tokenizer: SentencePiece training failed with data.vocab_size={vocab_size}: {e}"
        ) from e
    files.write_bytes(path, out.getvalue())
    return load_tokenizer(path, pad_id=pad_id)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """The model's embedding must cover every token id."""
    if model_vocab_size < tokenizer.vocab_size:
        raise RetroError(
            f"model.vocab_size={model_vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}, data.vocab_size / data.tokenizer={tokenizer.path}): "
            "raise model.vocab_size or lower data.vocab_size"
        )
