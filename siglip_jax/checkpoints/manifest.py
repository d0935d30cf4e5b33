"""An integrity manifest beside each checkpoint step: every file's size (and small files' crc32).

Orbax commits a step once every process's part is written (a directory rename on local disk,
`commit_success.txt` on GCS), but it checks nothing when reading back: a file truncated or
overwritten later (a partial copy, a bad disk) surfaces as a tensorstore error or, worse, as
wrong values. After orbax has finalised a step, process 0 lists the step directory and writes
`<step>/integrity_manifest.json`: {relative path: size} for every file, plus the crc32 of every
file of at most SMALL_FILE_BYTES (the JSON metadata orbax needs). Before a restore, `check`
compares the step with it and names the first file that is missing, has another size or
another checksum. Works alike on local disk and `gs://` (through `siglip_jax.fsutil`).
"""

from __future__ import annotations

import json
import zlib

from siglip_jax import fsutil

NAME = "integrity_manifest.json"
SMALL_FILE_BYTES = 64 * 1024
VERSION = 1


def build(step_dir: str) -> dict[str, object]:
    """The manifest of the files now under `step_dir` (the manifest itself left out)."""
    sizes = {rel: size for rel, size in fsutil.file_sizes(step_dir).items() if rel != NAME}
    crc32 = {rel: zlib.crc32(fsutil.read_bytes(fsutil.join(step_dir, rel)))
             for rel, size in sorted(sizes.items()) if size <= SMALL_FILE_BYTES}
    return {"version": VERSION, "sizes": dict(sorted(sizes.items())), "crc32": crc32}


def write(step_dir: str) -> None:
    """Writes the manifest of `step_dir` (call it once the step is committed, on one process)."""
    text = json.dumps(build(step_dir), indent=1, sort_keys=True)
    fsutil.write_text_atomic(fsutil.join(step_dir, NAME), text)


def has_manifest(step_dir: str) -> bool:
    """Whether `step_dir` has a manifest (steps saved before manifests, or interrupted between
    orbax's commit and the manifest, have none)."""
    return fsutil.exists(fsutil.join(step_dir, NAME))


def check(step_dir: str) -> str | None:
    """None if `step_dir` matches its manifest, else one line naming the first bad file.

    The step must have a manifest (`has_manifest`); an unreadable manifest is itself damage.
    Files added since (not in the manifest) are ignored.
    """
    try:
        manifest = json.loads(fsutil.read_text(fsutil.join(step_dir, NAME)))
        sizes, crc32 = manifest["sizes"], manifest["crc32"]
    except Exception as e:  # noqa: BLE001 - any unreadable manifest is damage.
        return f"file {NAME} is unreadable ({type(e).__name__})"
    present = fsutil.file_sizes(step_dir)
    for rel, size in sorted(sizes.items()):
        if rel not in present:
            return f"file {rel} is missing"
        if present[rel] != size:
            return f"file {rel} has {present[rel]} bytes, the manifest says {size}"
    for rel, expected in sorted(crc32.items()):
        if zlib.crc32(fsutil.read_bytes(fsutil.join(step_dir, rel))) != expected:
            return f"file {rel} has another crc32 than the manifest says"
    return None
