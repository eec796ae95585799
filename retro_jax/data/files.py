"""File operations on local paths or on any tf.io.gfile scheme (gs://, ram://, ...).

A path with "://" is remote: it goes through TensorFlow's tf.io.gfile, imported only then (the
model and the train step import this module without TensorFlow). Local paths use os, open and
shutil exactly as before. Writes are atomic-looking: a temporary name, then a rename (a remote
file is written whole from a buffer, so any writer works on it). `load_npy` memory-maps local
files (memory bounded by what is touched) and reads remote ones whole (bounded by one shard).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import re
import shutil
import tempfile

import numpy as np


def is_remote(path) -> bool:
    return "://" in str(path)


def _ram(path: str) -> bool:
    """TensorFlow's in-memory ram:// matches names by prefix ("a" exists while "a.tmp" does, and
    is listed in "a"'s listing): for it, existence is asked exactly (a glob) and folders are
    always made explicitly."""
    return path.startswith("ram://")


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def open(path: str, mode: str = "r"):  # noqa: A001 - the module's file-like `open`
    """A file object; FileNotFoundError for a missing remote file, as locally."""
    if not is_remote(path):
        return builtins.open(path, mode)
    if "r" in mode and not exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if "w" in mode and _ram(path):
        makedirs(os.path.dirname(path))
        delete(path)  # (ram:// appends to an existing file instead of truncating it)
    return _gfile().GFile(path, mode)


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    return bool(_gfile().glob(path)) if _ram(path) else _gfile().exists(path)


def isdir(path: str) -> bool:
    if not is_remote(path):
        return os.path.isdir(path)
    return (not _ram(path) or exists(path)) and _gfile().isdir(path)


def isfile(path: str) -> bool:
    return exists(path) and not isdir(path) if is_remote(path) else os.path.isfile(path)


def makedirs(path: str) -> None:
    _gfile().makedirs(path) if is_remote(path) else os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
    if not is_remote(path):
        return os.listdir(path)
    if not isdir(path):
        raise FileNotFoundError(f"no such folder: {path}")
    names = [name.rstrip("/") for name in _gfile().listdir(path)]
    return [n for n in names if exists(f"{path}/{n}")] if _ram(path) else names


def remove(path: str) -> None:
    _gfile().remove(path) if is_remote(path) else os.remove(path)


def rmtree(path: str) -> None:
    if not is_remote(path):
        shutil.rmtree(path)
    elif not _ram(path):
        _gfile().rmtree(path)
    else:  # (ram://'s own removal trips over its prefix matches)
        for root, _, names in reversed(list(walk(path))):
            for name in names + [""]:
                _gfile().remove(f"{root}/{name}".rstrip("/"))


def delete(path: str) -> None:
    """Remove a file or a folder with its contents, if there is one."""
    if isdir(path):
        rmtree(path)
    elif exists(path):
        remove(path)


def replace(source: str, target: str) -> None:
    """os.replace for files and folders; a remote folder moves file by file, then its source
    is removed (object stores have no folder rename)."""
    if not is_remote(source) and not is_remote(target):
        os.replace(source, target)
    elif not isdir(source):
        _gfile().rename(source, target, overwrite=True)
    else:
        delete(target)
        for folder, names in _tree(source, target):
            for name in names:
                _gfile().rename(f"{folder[0]}/{name}", f"{folder[1]}/{name}", overwrite=True)
        rmtree(source)


def _tree(source: str, target: str):
    """((folder under source, the same under target), file names) of every folder of
    `source`, top-down; the target folders are created."""
    source, target = source.rstrip("/"), target.rstrip("/")
    for root, _, names in walk(source):
        folder = target + root[len(source) :]
        makedirs(folder)
        yield (root, folder), names


def walk(top: str):
    """(folder, subfolders, files) top-down, like os.walk (sort subfolders in place to order)."""
    if not is_remote(top):
        yield from os.walk(top)
        return
    if not isdir(top):
        return
    names = listdir(top)
    folders = [name for name in names if isdir(f"{top}/{name}")]
    yield top, folders, sorted(set(names) - set(folders))
    for folder in folders:
        yield from walk(f"{top}/{folder}")


def stat(path: str) -> tuple[int, int]:
    """(size in bytes, modification time in ns)."""
    if is_remote(path):
        info = _gfile().stat(path)
        return int(info.length), int(info.mtime_nsec)
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns


def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob; `**` matches any number of folders (as recursive=True)."""
    if not is_remote(pattern):
        import glob as globbing

        return sorted(globbing.glob(pattern, recursive=True))
    if "**" not in pattern:
        return sorted(_gfile().glob(pattern))
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    top = "/".join(parts[:fixed])
    regex = re.compile(re.escape(top) + "".join(_glob_regex(p) for p in parts[fixed:]))
    found = []
    for root, dirs, names in walk(top):
        found += [p for p in (f"{root}/{n}" for n in dirs + names) if regex.fullmatch(p)]
    return sorted(found)


def _glob_regex(part: str) -> str:
    """One path component of a glob as a regex that starts at its leading "/"."""
    if part == "**":
        return "(/[^/]+)*"
    out = "/"
    for piece in re.split(r"(\*|\?|\[[^\]]*\])", part):
        if piece in ("*", "?"):
            out += "[^/]*" if piece == "*" else "[^/]"
        elif piece.startswith("["):
            out += "[^" + piece[2:] if piece.startswith("[!") else piece
        else:
            out += re.escape(piece)
    return out


def copy(source: str, target: str) -> None:
    """Copy one file (replacing the target)."""
    if not is_remote(source) and not is_remote(target):
        shutil.copyfile(source, target)
    else:
        if _ram(target):
            delete(target)  # (ram:// appends to an existing file)
        _gfile().copy(source, target, overwrite=True)


def copy_tree(source: str, target: str) -> None:
    """Copy a folder's files and subfolders into `target` (created)."""
    for folder, names in _tree(source, target):
        for name in names:
            copy(f"{folder[0]}/{name}", f"{folder[1]}/{name}")


@contextlib.contextmanager
def local_copy(folder: str):
    """A local path to the files of `folder`: itself if local, else a temporary copy (for
    libraries that only read local folders: ScaNN, Hugging Face)."""
    if not is_remote(folder):
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="retro_jax-") as local:
        copy_tree(folder, local)
        yield local


# ---------------------------------------------------------------- whole files


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """A file to write `path` through: path + ".tmp", renamed to `path` when the block ends."""
    tmp = path + ".tmp"
    if not is_remote(path):
        with builtins.open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
        return
    buffer = io.BytesIO() if "b" in mode else io.StringIO()
    yield buffer
    with open(tmp, "wb") as f:
        value = buffer.getvalue()
        f.write(value if "b" in mode else value.encode("utf-8"))
    replace(tmp, path)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_json(path: str, value, **dump_options) -> None:
    """json.dump(value, **dump_options) written atomically."""
    with atomic_write(path, "w") as f:
        json.dump(value, f, **dump_options)


def save_npy(path: str, array: np.ndarray) -> None:
    with atomic_write(path, "wb") as f:
        np.save(f, array)


def load_npy(path: str, mmap: bool = True):
    """np.load: memory-mapped when local and `mmap`; a remote file is read whole (an .npz
    gives np.load's NpzFile either way)."""
    if is_remote(path):
        return np.load(io.BytesIO(read_bytes(path)))
    return np.load(path, mmap_mode="r" if mmap else None)
