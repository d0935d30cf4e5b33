"""The trainer CLI: `python -m siglip_jax.train --config configs/x.py --workdir DIR [--config.k=v]`.

Parses the flags and hands over to `trainer.run_cli` (the loop itself is `trainer.train`).
Rerunning the same command resumes from the newest checkpoint in the workdir; SIGTERM
(preemption) saves a checkpoint and exits with code 143.

Multi-process runs: on a multi-host TPU slice JAX finds its peers; elsewhere pass
`--coordinator HOST:PORT --num_processes N --process_id I` (or SIGLIP_* env variables, see
distributed.py). Each process then emulates `cpu_devices / N` CPU devices.

Exit codes: 0 done; 2 a bad config, argument or workdir; 1 a failure while running; 143
preempted after saving (trainer.py says which errors are which). Every error is one `error:`
line, and the process exits promptly (shutdown.run_main) even with input threads and an async
checkpointer running.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from siglip_jax.config import collect_overrides
from siglip_jax.console import add_verbose_flag, quiet_startup
from siglip_jax.shutdown import run_main


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parses --config, --workdir, the multi-process flags and `--config.a.b=value` overrides."""
    parser = argparse.ArgumentParser(
        prog="python -m siglip_jax.train",
        description="Train a SigLIP model. Extra flags --config.KEY=VALUE override config keys.")
    parser.add_argument("--config", required=True, help="configs/file.py or configs/file.py:arg")
    parser.add_argument("--workdir", required=True, help="where checkpoints and metrics go")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 (multi-process, not TPU)")
    parser.add_argument("--num_processes", type=int, help="number of processes")
    parser.add_argument("--process_id", type=int, help="this process's index")
    parser.add_argument("--heartbeat_timeout", type=int,
                        help="seconds after which a silent process counts as dead (default 100)")
    add_verbose_flag(parser)
    args, rest = parser.parse_known_args(argv)
    return args, collect_overrides(rest, parser.error)



def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code (see the module docstring)."""
    argv = quiet_startup(argv)
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    # Imported only now, on purpose: the trainer loads TensorFlow and JAX, which read the
    # logging environment quiet_startup has just set, and `--help` stays instant.
    from siglip_jax import trainer

    return trainer.run_cli(args, overrides)


if __name__ == "__main__":
    run_main(main)
