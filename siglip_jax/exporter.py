"""Exporting a checkpoint's towers, decoder or EMA teacher: `export(checkpoint, fmt, out, part)`.

The checkpoint is opened with `checkpoints.open.open_model` (our workdir or step directory, a
big_vision .npz or a HF SigLIP directory); checkpoints/parts.py says what each part keeps and
how each format is written. `run_cli` is what `python -m siglip_jax.export` runs after parsing
its flags (export.py, whose docstring lists the parts, formats and exit codes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable

from siglip_jax.checkpoints import hf_processor, loader, parts
from siglip_jax.checkpoints.hf import HFCheckpointError
from siglip_jax.checkpoints.loader import (
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
)
from siglip_jax.checkpoints.open import OpenedModel, open_model, resolve_path
from siglip_jax.checkpoints.parts import ExportError, sidecar_path


def resolve_step(path: str, step: int | None) -> tuple[str, int | None]:
    """(the step directory to read, its step) for a workdir; other paths as given."""
    is_workdir = os.path.isdir(os.path.join(path, "checkpoints"))
    if not is_workdir:
        if step is not None:
            raise ExportError(f"--step {step} needs a workdir (with checkpoints/), got {path!r}")
        base = os.path.basename(path.rstrip("/"))
        return path, int(base) if base.isdigit() else None
    steps = loader.saved_steps(path)
    if not steps:
        raise loader.CheckpointNotFoundError(f"checkpoint {path!r}: the workdir has no saved "
                                             "step in checkpoints/ yet")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ExportError(f"--step {step}: {path!r} has no saved step {step} (saved: {steps})")
    return os.path.join(path, "checkpoints", str(step)), step


def check_out(out: str, part: str, force: bool) -> None:
    """Refuses to overwrite an existing output unless forced; creates the parent directory."""
    targets = [out] + ([sidecar_path(out)] if part == "decoder" else [])
    existing = [t for t in targets
                if os.path.isfile(t) or (os.path.isdir(t) and os.listdir(t))]
    if existing and not force:
        raise ExportError(f"--out {existing[0]!r} exists; pass --force to overwrite it")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)


def export(checkpoint: str, fmt: str, out: str, part: str = "towers", *,
           step: int | None = None, tokenizer: str | None = None, force: bool = False,
           log: Callable[[str], None] = print) -> dict[str, object]:
    """Writes `part` of the checkpoint to `out`; returns {"files", "kept", "dropped", "step"}.

    Everything is written into a temporary sibling of `out` first and moved into place only
    when complete: a failed export leaves no half-written `out` (nor replaces an old one)."""
    if part not in parts.PARTS:
        raise parts.ExportError(f"--part {part!r}: expected one of {parts.PARTS}")
    if fmt not in parts.FORMATS:
        raise parts.ExportError(f"--format {fmt!r}: expected one of {parts.FORMATS}")
    if part == "decoder" and fmt != "npz":
        raise parts.ExportError("--part decoder is written as --format npz (a .npz of "
                                "params/dec/... and a .json sidecar); HF has no decoder format")
    if fmt == "npz" and not out.endswith(".npz"):
        raise parts.ExportError(f"--out {out!r}: an npz export is a file ending in .npz")
    out = resolve_path(out)
    path, step = resolve_step(resolve_path(checkpoint), step)
    check_out(out, part, force)
    opened = open_model(path, {"tokenizer": resolve_path(tokenizer)} if tokenizer else None)
    where = f"{opened.path} ({opened.format}" + (f", step {step})" if step is not None else ")")
    log(f"reading {where}")
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-",
                               dir=os.path.dirname(out))
    try:
        staged = os.path.join(staging, os.path.basename(out))
        files, kept, dropped = _write(opened, path, part, fmt, staged, where, log)
        files = _move_into_place(staging, staged, out, files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"kept {', '.join(kept)}; dropped {', '.join(dropped) or 'nothing'}")
    for file in files:
        log(f"wrote {file} ({_size(file)})")
    return {"files": files, "kept": kept, "dropped": dropped, "step": step}


def _write(opened: OpenedModel, path: str, part: str, fmt: str, out: str, where: str,
           log: Callable[[str], None]) -> tuple[list[str], list[str], list[str]]:
    """Writes the part to `out` (a staging path); returns (files, kept, dropped)."""
    params = opened.params
    if part == "decoder":
        files = parts.save_decoder(out, params, opened.model_config,
                                   tokenizer=opened.tokenizer, source=where)
        return files, ["dec"], sorted(k for k in params if k != "dec")
    towers, dropped = parts.tower_params(params)
    if part == "teacher":
        teacher = (loader.load_state_entry(path, "teacher") if opened.format == "orbax"
                   else None)
        towers = parts.teacher_towers(params, teacher, where)
        log("image tower: the EMA teacher's; text tower, t, b: the student's")
    convention = parts.hf_convention(opened.model_config, opened.convention)
    files = parts.save_towers(
        out, towers, fmt, model_config=opened.model_config, image_size=opened.image_size,
        text_len=opened.text_len, tokenizer=None, convention=convention)
    if fmt == "hf":
        written, notes = hf_processor.write_processor_files(
            out, image_config=_image_processor(opened), tokenizer=opened.tokenizer,
            convention=convention, text_len=int(opened.text_len))
        files += written
        for note in notes:
            log(f"note: {note}")
    _notes(opened, fmt, convention, log)
    return files, sorted(towers), dropped


def _image_processor(opened: OpenedModel) -> dict[str, object]:
    """The HF image processor config of the opened model (FixRes size or NaFlex budget)."""
    if not opened.is_naflex:
        return hf_processor.image_processor_config(naflex=False, image_size=opened.image_size)
    patch = opened.model.image.patch_size or (16, 16)
    return hf_processor.image_processor_config(
        naflex=True, patch_size=int(patch[0]), max_num_patches=opened.max_num_patches or 256)


def _move_into_place(staging: str, staged: str, out: str, files: list[str]) -> list[str]:
    """Moves the staged export (a directory, or a file and its sidecars) to `out`, replacing
    what --force allowed to replace; returns the final paths of `files`."""
    final = [os.path.join(os.path.dirname(out), os.path.relpath(f, staging)) for f in files]
    if os.path.isdir(staged):
        if os.path.isdir(out):
            shutil.rmtree(out)
        elif os.path.exists(out):
            os.remove(out)
        os.rename(staged, out)
        return final
    for src, dst in zip(files, final, strict=True):
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        os.replace(src, dst)
    return final


def _notes(opened: OpenedModel, fmt: str, convention: str, log: Callable[[str], None]) -> None:
    """One-line notes on what a towers export does not carry over."""
    if fmt == "npz":
        if opened.tokenizer:
            log(f"note: a .npz carries no tokenizer; this checkpoint's is {opened.tokenizer}")
        return
    if not opened.tokenizer:
        log("note: the checkpoint names no tokenizer, none copied (pass --tokenizer FILE); "
            "AutoProcessor and pipeline() need one")
    ours = parts.run_convention(opened.convention, opened.eos)
    if opened.format != "hf" and ours != convention:
        log(f"note: the HF directory tokenizes prompts by the {convention!r} convention; this "
            f"checkpoint used {ours or 'eos=' + repr(opened.eos)}")


def _size(file: str) -> str:
    size = os.path.getsize(file)
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def run_cli(args: argparse.Namespace) -> int:
    """The export CLI after its flags are parsed: export, and map errors to one `error:`
    line and the exit code (export.py's docstring)."""
    try:
        export(args.checkpoint, args.format, args.out, args.part, step=args.step,
               tokenizer=args.tokenizer, force=args.force)
    except (CheckpointNotFoundError, CheckpointFormatError, CheckpointMismatchError,
            HFCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ExportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
