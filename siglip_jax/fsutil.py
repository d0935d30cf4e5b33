"""File-tree helpers that work alike on local disk and on object stores such as `gs://`.

Local paths use `os`/`shutil` (a directory rename is one atomic step there). Remote paths
(`scheme://...`) go through `tf.io.gfile`. An object store has no directory rename: moving a
tree there is copy-then-delete, done in that order over the WHOLE tree (every file copied
before the first is deleted), so an interruption at any point leaves a complete copy at the
source or at the target, never two halves.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import threading
from types import ModuleType


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` names an object store or other `scheme://` filesystem."""
    return "://" in os.fspath(path)


def _gfile() -> ModuleType:
    # Late: TensorFlow takes seconds to import and only remote paths need it.
    import tensorflow as tf

    return tf.io.gfile


def exists(path: str) -> bool:
    """Whether a file or directory `path` exists."""
    return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def remote_lookup(path: str, pattern: bool = False, timeout_s: float = 30.0
                  ) -> tuple[bool | None, str]:
    """(found, "") if remote `path` (a glob if `pattern`) could be looked up, else (None, why):
    no credentials, no network, an unknown scheme, or no answer within `timeout_s` (the
    look-up then goes on in a daemon thread, ignored)."""
    answer: dict[str, object] = {}

    def look() -> None:
        try:
            gfile = _gfile()
            answer["found"] = bool(gfile.glob(path)) if pattern else gfile.exists(path)
        except Exception as e:  # noqa: BLE001 - any failure means "could not look".
            text = re.sub(r"\s+", " ", str(e)).strip()
            answer["why"] = f"{type(e).__name__}: {text[:150]}"

    thread = threading.Thread(target=look, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "found" in answer:
        return bool(answer["found"]), ""
    return None, str(answer.get("why", f"no answer within {timeout_s:.0f} s"))


def read_text(path: str) -> str:
    """The text of file `path` (UTF-8)."""
    if is_remote(path):
        with _gfile().GFile(path, "r") as f:
            return f.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_bytes(path: str) -> bytes:
    """The bytes of file `path`."""
    if is_remote(path):
        with _gfile().GFile(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to file `path`, creating its parent directories (local or remote)."""
    if is_remote(path):
        _gfile().makedirs(posixpath.dirname(path))
        with _gfile().GFile(path, "wb") as f:
            f.write(data)
        return
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def write_text_atomic(path: str, text: str) -> None:
    """Writes `text` (UTF-8) to file `path` so that a reader sees the old or the whole new file.

    Local: a temporary file beside it, then `os.replace`. Remote: one object upload (an object
    store replaces an object whole).
    """
    if is_remote(path):
        with _gfile().GFile(path, "w") as f:
            f.write(text)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def join(root: str, *parts: str) -> str:
    """`root`/parts, with '/' separators for remote paths."""
    return posixpath.join(root, *parts) if is_remote(root) else os.path.join(root, *parts)


def file_sizes(root: str) -> dict[str, int]:
    """{relative path ('/'-separated): size in bytes} of every file under directory `root`."""
    sizes = {}
    if is_remote(root):
        gfile = _gfile()
        root = root.rstrip("/")
        for folder, _, files in gfile.walk(root):
            rel = folder.rstrip("/")[len(root):].lstrip("/")
            for name in files:
                sizes[posixpath.join(rel, name)] = gfile.stat(
                    posixpath.join(folder, name)).length
        return sizes
    for folder, _, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        for name in files:
            key = name if rel == "." else posixpath.join(*rel.split(os.sep), name)
            sizes[key] = os.path.getsize(os.path.join(folder, name))
    return sizes


def move_tree(src: str, dst: str) -> None:
    """Moves directory `src` to `dst` (which must not exist; its parent is created).

    Local: one `os.rename`. Remote: every file is copied to `dst`, then `src` is deleted.
    """
    if not is_remote(src) and not is_remote(dst):
        os.makedirs(os.path.dirname(dst.rstrip(os.sep)) or ".", exist_ok=True)
        os.rename(src, dst)
        return
    gfile = _gfile()
    gfile.makedirs(dst)
    for rel in sorted(file_sizes(src)):
        target = posixpath.join(dst, rel)
        gfile.makedirs(posixpath.dirname(target))
        gfile.copy(posixpath.join(src, rel), target, overwrite=True)
    gfile.rmtree(src)


def remove_tree(path: str) -> None:
    """Deletes directory `path` and everything under it."""
    if is_remote(path):
        _gfile().rmtree(path)
    else:
        shutil.rmtree(path)
