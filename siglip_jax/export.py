"""Export a checkpoint's towers (big_vision .npz / Hugging Face), its decoder or its EMA teacher.

    python -m siglip_jax.export --checkpoint RUN_OR_STEP --format npz|hf --out PATH \
        [--part towers|decoder|teacher] [--step N] [--tokenizer FILE] [--force]

RUN_OR_STEP is our trainer's workdir (newest step, or `--step N`) or step directory; a
big_vision .npz or a HF SigLIP directory also works as input (format conversion). It is
opened with `checkpoints.open.open_model`.

Parts (checkpoints/parts.py):
  towers   (default) img, txt, t, b only — the decoder `dec`, the self-distillation heads
           `distill_head`, `masked_head` and `mask_token` are dropped. `--format npz`: a
           big_vision params .npz (`params/...`, the run's block layout). `--format hf`: a
           directory transformers' SiglipModel (FixRes) or Siglip2Model (NaFlex) loads, with
           the run's sentencepiece file as `spiece.model` (SigLIP) or `tokenizer.model`
           (SigLIP 2 convention or NaFlex).
  teacher  the towers with the image tower of the EMA teacher (runs trained with
           loss.self_distillation / loss.masked_prediction), text tower, t, b of the student.
  decoder  `params/dec/...` in a .npz plus `<out>.json` (decoder config, vocabulary layout,
           image width) and `<out>.tokenizer.model`; reload with `parts.load_decoder`.

Exit codes: 0 written; 2 a bad argument (unknown step, a part or format this checkpoint
cannot give, an existing --out without --force); 1 an unreadable or missing checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from siglip_jax.console import quiet_startup


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parses the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m siglip_jax.export",
        description="Export a checkpoint's towers as a big_vision .npz or a Hugging Face "
                    "directory, its LocCa decoder (.npz + .json) or its EMA teacher's towers.")
    parser.add_argument("--checkpoint", required=True,
                        help="our workdir or step dir (also a big_vision .npz or HF SigLIP dir)")
    parser.add_argument("--format", required=True, choices=("npz", "hf"),
                        help="npz: big_vision params file; hf: Hugging Face directory")
    parser.add_argument("--out", required=True, help="the .npz file or HF directory to write")
    parser.add_argument("--part", default="towers", choices=("towers", "decoder", "teacher"),
                        help="what to export (default: towers)")
    parser.add_argument("--step", type=int, help="the step of a workdir (default: newest)")
    parser.add_argument("--tokenizer", help="sentencepiece file to copy into a HF export "
                                            "(default: the checkpoint's)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    return parser.parse_args(argv)


def resolve_step(path: str, step: int | None) -> tuple[str, int | None]:
    """(the step directory to read, its step) for a workdir; other paths as given."""
    from siglip_jax.checkpoints import loader
    from siglip_jax.checkpoints.parts import ExportError

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
    from siglip_jax.checkpoints.parts import ExportError, sidecar_path

    targets = [out] + ([sidecar_path(out)] if part == "decoder" else [])
    existing = [t for t in targets
                if os.path.isfile(t) or (os.path.isdir(t) and os.listdir(t))]
    if existing and not force:
        raise ExportError(f"--out {existing[0]!r} exists; pass --force to overwrite it")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)


def export(checkpoint: str, fmt: str, out: str, part: str = "towers", *,
           step: int | None = None, tokenizer: str | None = None, force: bool = False,
           log: Callable[[str], None] = print) -> dict[str, Any]:
    """Writes `part` of the checkpoint to `out`; returns {"files", "kept", "dropped", "step"}."""
    from siglip_jax.checkpoints import loader, parts
    from siglip_jax.checkpoints.open import open_model, resolve_path

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
    params = opened.params
    if part == "decoder":
        files = parts.save_decoder(out, params, opened.model_config,
                                   tokenizer=opened.tokenizer, source=where)
        kept, dropped = ["dec"], sorted(k for k in params if k != "dec")
    else:
        towers, dropped = parts.tower_params(params)
        if part == "teacher":
            teacher = (loader.load_state_entry(path, "teacher") if opened.format == "orbax"
                       else None)
            towers = parts.teacher_towers(params, teacher, where)
            log("image tower: the EMA teacher's; text tower, t, b: the student's")
        kept = sorted(towers)
        convention = parts.hf_convention(opened.model_config, opened.convention)
        files = parts.save_towers(
            out, towers, fmt, model_config=opened.model_config, image_size=opened.image_size,
            text_len=opened.text_len, tokenizer=opened.tokenizer if fmt == "hf" else None,
            convention=convention)
        _notes(opened, fmt, convention, log)
    log(f"kept {', '.join(kept)}; dropped {', '.join(dropped) or 'nothing'}")
    for file in files:
        log(f"wrote {file} ({_size(file)})")
    return {"files": files, "kept": kept, "dropped": dropped, "step": step}


def _notes(opened: Any, fmt: str, convention: str, log: Callable[[str], None]) -> None:
    """One-line notes on what a towers export does not carry over."""
    from siglip_jax.checkpoints import parts

    if fmt == "npz":
        if opened.tokenizer:
            log(f"note: a .npz carries no tokenizer; this checkpoint's is {opened.tokenizer}")
        return
    if not opened.tokenizer:
        log("note: the checkpoint names no tokenizer, none copied (pass --tokenizer FILE)")
    ours = parts.run_convention(opened.convention, opened.eos)
    if opened.format != "hf" and ours != convention:
        log(f"note: the HF directory tokenizes prompts by the {convention!r} convention; this "
            f"checkpoint used {ours or 'eos=' + repr(opened.eos)}")


def _size(file: str) -> str:
    size = os.path.getsize(file)
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    argv = quiet_startup(argv)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from siglip_jax.checkpoints.hf import HFCheckpointError
    from siglip_jax.checkpoints.loader import (
        CheckpointFormatError,
        CheckpointMismatchError,
        CheckpointNotFoundError,
    )
    from siglip_jax.checkpoints.parts import ExportError

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


if __name__ == "__main__":
    from siglip_jax.shutdown import run_main

    run_main(main)
