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
import sys
from collections.abc import Sequence

from siglip_jax.console import add_verbose_flag, quiet_startup
from siglip_jax.shutdown import run_main


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
    add_verbose_flag(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    argv = quiet_startup(argv)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Imported only now, on purpose: the exporter loads TensorFlow and JAX, which read the
    # logging environment quiet_startup has just set, and `--help` stays instant.
    from siglip_jax import exporter

    return exporter.run_cli(args)


if __name__ == "__main__":
    run_main(main)
