"""The trainer: `python -m siglip_jax.train --config configs/x.py --workdir DIR [--config.k=v]`.

`main()` only parses flags and calls `train(config, workdir)`; the pieces (`build_input`,
`init_state`, `make_train_step`, `build_evaluators`) are module-level functions with tests.
Rerunning the same command resumes from the newest checkpoint in the workdir.

Top-level config keys read here (sections are documented in the module that reads them):
  seed, total_steps, log_every, time_budget_s (0: none; stop training early so that the run,
  final evaluation included, ends within the budget), cpu_devices (emulated devices when JAX
  runs on CPU), mesh, batch_axes, sharding_rules, input, tokenizer, model, loss, optim, lr, wd,
  grad_clip_norm, schedule, evals, checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from siglip_jax.config import ConfigError, load_config, to_plain

TRAIN_KEYS = (
    "seed", "total_steps", "log_every", "time_budget_s", "cpu_devices", "mesh", "batch_axes",
    "sharding_rules", "input", "tokenizer", "model", "loss", "optim", "lr", "wd",
    "grad_clip_norm", "schedule", "evals", "checkpoint",
)


class WorkdirError(OSError):
    """The workdir cannot be created or written."""


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parses --config, --workdir and the `--config.a.b=value` overrides."""
    parser = argparse.ArgumentParser(
        prog="python -m siglip_jax.train",
        description="Train a SigLIP model. Extra flags --config.KEY=VALUE override config keys.")
    parser.add_argument("--config", required=True, help="configs/file.py or configs/file.py:arg")
    parser.add_argument("--workdir", required=True, help="where checkpoints and metrics go")
    args, rest = parser.parse_known_args(argv)
    overrides, i = [], 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--config."):
            parser.error(f"unrecognized argument {item!r} (overrides look like --config.key=value)")
        item = item[len("--config."):]
        if "=" not in item:
            if i + 1 >= len(rest):
                parser.error(f"override --config.{item} has no value")
            item, i = f"{item}={rest[i + 1]}", i + 1
        overrides.append(item)
        i += 1
    return args, overrides


def prepare_workdir(workdir: str) -> None:
    """Creates `workdir` and checks it is writable; raises WorkdirError otherwise."""
    import tensorflow as tf

    try:
        tf.io.gfile.makedirs(workdir)
        probe = os.path.join(workdir, f".write_test_{os.getpid()}")
        with tf.io.gfile.GFile(probe, "w") as f:
            f.write("ok")
        tf.io.gfile.remove(probe)
    except (OSError, tf.errors.OpError) as e:
        message = getattr(e, "message", None) or getattr(e, "strerror", None) or str(e)
        raise WorkdirError(f"workdir {workdir!r} is not writable: {message}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config, overrides)
        check_config(config)
        prepare_workdir(args.workdir)
    except (ConfigError, WorkdirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    setup_jax(config)
    try:
        train(config, args.workdir)
    except (ConfigError, FileNotFoundError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def check_config(config: Any) -> None:
    """Rejects unknown top-level keys (a typo must not be silently ignored)."""
    from siglip_jax.config import check_keys

    check_keys(config, TRAIN_KEYS, "config")


def setup_jax(config: Any) -> None:
    """JAX settings that must be made before the backend starts."""
    import jax

    jax.config.update("jax_threefry_partitionable", True)
    jax.config.update("jax_num_cpu_devices", int(config.get("cpu_devices", 8)))


class NonFiniteError(FloatingPointError):
    """The loss or the gradients became NaN/Inf."""


# ----------------------------------------------------------------------------- the pieces


def build_input(config: Any, mesh: Any, start_step: int) -> tuple[Iterator, Any, Any]:
    """The training batch iterator, the tokenizer and the data source."""
    import jax

    from siglip_jax.data import input as input_lib
    from siglip_jax.data.builder import make_source
    from siglip_jax.data.pp import get_preprocess_fn
    from siglip_jax.sharding import num_batch_shards

    cfg = config.input
    global_batch = int(cfg.global_batch)
    shards = num_batch_shards(mesh, tuple(config.batch_axes))
    if global_batch % shards or global_batch % jax.process_count():
        raise ConfigError(f"input.global_batch={global_batch} must be divisible by the "
                          f"{shards} batch shards and {jax.process_count()} processes")
    source = make_source(cfg.data)
    tokenizer = load_tokenizer(config, source)
    preprocess = get_preprocess_fn(cfg.pp, tokenizer=tokenizer)
    seed = int(config.seed)
    dataset = source.dataset(jax.process_index(), jax.process_count(), shuffle_files=True,
                             seed=seed)
    batches = input_lib.train_batches(
        dataset, preprocess, local_batch=global_batch // jax.process_count(),
        seed=seed, example_seed=seed * 65_537 + jax.process_index(),
        shuffle_buffer=int(cfg.get("shuffle_buffer", 10_000)),
        start_step=start_step, cache=bool(cfg.get("cache", False)))
    return batches, tokenizer, source


def load_tokenizer(config: Any, source: Any = None) -> Any:
    """The sentencepiece tokenizer named by config.tokenizer.model (or the data source's)."""
    from siglip_jax.data.tokenizer import Tokenizer

    path = config.tokenizer.get("model") or getattr(source, "tokenizer_path", None)
    if not path:
        raise ConfigError("config.tokenizer.model is not set and the data source provides no "
                          "tokenizer; give the path of a sentencepiece .model file")
    if not os.path.exists(path) and "://" not in path:
        raise ConfigError(f"config.tokenizer.model: no such file {path!r}")
    return Tokenizer(path)


def check_vocab(config: Any, tokenizer: Any) -> None:
    """The text tower's embedding table must cover every token id the tokenizer produces."""
    vocab = config.model.text.get("vocab_size") if config.model.get("text") else None
    if vocab is not None and tokenizer.vocab_size > int(vocab):
        raise ConfigError(f"config.model.text.vocab_size={vocab} is smaller than the "
                          f"tokenizer's vocabulary ({tokenizer.vocab_size} ids)")


def make_model(config: Any) -> Any:
    """The two-tower model described by config.model."""
    from siglip_jax.models.two_towers import Model

    return Model(**to_plain(config.model))


def init_state(model: Any, tx: Any, batch_shapes: dict[str, tuple[int, ...]], mesh: Any,
               rules: Sequence, seed: int) -> tuple[dict, dict]:
    """Creates the train state already sharded (shapes first, then a jitted init).

    Returns (state, state_shardings); state = {"params", "opt_state", "step"}.
    """
    import jax
    import jax.numpy as jnp

    from siglip_jax.sharding import follow_params, param_shardings, replicated

    def init_params(rng):
        image = jnp.zeros(batch_shapes["image"], jnp.float32)
        text = jnp.zeros(batch_shapes["labels"], jnp.int32)
        return model.init(rng, image, text)["params"]

    def init_all(rng):
        params = init_params(rng)
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    rng = jax.random.key(seed)
    abstract = jax.eval_shape(init_all, rng)
    pshard = param_shardings(abstract["params"], [tuple(r) for r in rules], mesh)
    shardings = {
        "params": pshard,
        "opt_state": follow_params(abstract["opt_state"], abstract["params"], pshard, mesh),
        "step": replicated(mesh),
    }
    state = jax.jit(init_all, out_shardings=shardings)(rng)
    return state, shardings


def make_train_step(model: Any, tx: Any, loss_fn: Callable, lr_fn: Callable) -> Callable:
    """The pure step function (state, batch) → (state, metrics), to be jitted by the caller."""
    import jax
    import jax.numpy as jnp
    import optax

    def train_step(state, batch):
        def compute_loss(params):
            zimg, ztxt, out = model.apply({"params": params}, batch["image"], batch["labels"],
                                          train=True)
            return loss_fn(zimg, ztxt, jnp.reshape(out["t_prime"], ()),
                           jnp.reshape(out.get("b", jnp.zeros(())), ()))

        (loss, metrics), grads = jax.value_and_grad(compute_loss, has_aux=True)(
            state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "lr": lr_fn(state["step"]),
                   "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return train_step


# ----------------------------------------------------------------------------- the loop


def train(config: Any, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the run described by `config` in `workdir`; returns final metrics."""
    import jax

    from siglip_jax import losses
    from siglip_jax.checkpoints.orbax_io import Checkpointer, abstract_like
    from siglip_jax.evaluators.builder import build_evaluators
    from siglip_jax.metrics import MetricWriter, Progress
    from siglip_jax.optim import make_optimizer
    from siglip_jax.sharding import make_global_batch, make_mesh

    started = time.monotonic()
    is_host0 = jax.process_index() == 0
    log = (lambda *a: print(*a, flush=True)) if is_host0 else (lambda *a: None)
    total_steps = int(config.total_steps)
    mesh = make_mesh([tuple(axis) for axis in config.mesh])
    batch_axes = tuple(config.batch_axes)
    log(f"devices: {jax.device_count()} × {jax.devices()[0].platform} in "
        f"{jax.process_count()} process(es); mesh {dict(mesh.shape)}")
    if is_host0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(to_plain(config), f, indent=2, default=str)

    checkpointer = Checkpointer(workdir, int(config.checkpoint.every_n_steps),
                                keep=int(config.checkpoint.get("keep", 2)))
    start_step = checkpointer.latest_step() or 0
    batches, tokenizer, source = build_input(config, mesh, start_step)
    check_vocab(config, tokenizer)
    first = next(batches)
    shapes = {k: (v.shape[0] * jax.process_count(), *v.shape[1:]) for k, v in first.items()}

    model = make_model(config)
    abstract_params = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jax.numpy.zeros(shapes["image"]),
                           jax.numpy.zeros(shapes["labels"], jax.numpy.int32))["params"])
    tx, lr_fn = make_optimizer(config, abstract_params, total_steps)
    state, shardings = init_state(model, tx, shapes, mesh, config.sharding_rules,
                                  int(config.seed))
    if start_step:
        state = checkpointer.restore(abstract_like(state), start_step)
        log(f"resumed from checkpoint at step {start_step}")
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
    log(f"model: {num_params / 1e6:.2f} M parameters")

    loss_cfg = to_plain(config.loss)
    loss_fn = losses.make_loss(loss_cfg.pop("impl"), mesh, batch_axes, **loss_cfg)
    data_sharding = {k: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes))
                     for k in first}
    step_fn = jax.jit(make_train_step(model, tx, loss_fn, lr_fn),
                      in_shardings=(shardings, data_sharding),
                      out_shardings=(shardings, None), donate_argnums=(0,))

    evaluators = build_evaluators(config, model=model, mesh=mesh,
                                  param_shardings=shardings["params"], tokenizer=tokenizer)
    writer = MetricWriter(workdir, enabled=is_host0)
    budget = float(config.get("time_budget_s", 0) or 0)
    deadline = started + budget if budget else None
    progress = Progress(total_steps, start_step, int(config.input.global_batch),
                        budget_deadline=deadline, enabled=is_host0)
    log_every = int(config.log_every)
    eval_seconds = 0.0

    def run_evals(step: int, names: Sequence[str]) -> dict[str, float]:
        nonlocal eval_seconds
        t0 = time.monotonic()
        results = {}
        for name in names:
            for key, value in evaluators[name].run(state["params"]).items():
                results[f"{name}/{key}"] = value
        eval_seconds = time.monotonic() - t0
        if results:
            writer.write(step, results)
            log(f"eval at step {step}: " + ", ".join(
                f"{k} {v:.4f}" if not k.endswith("num_examples") else f"{k} {int(v)}"
                for k, v in results.items()) + f" ({eval_seconds:.1f}s)")
        progress.reset_clock(step)
        return results

    step = start_step
    pending = None  # (step, metrics) of the last dispatched step, read one step later.
    batch = first
    stopped_early = False
    log(f"training from step {start_step} to {total_steps}"
        + (f" within {budget:.0f}s" if budget else ""))
    while step < total_steps:
        global_batch = make_global_batch(batch, mesh, batch_axes)
        state, metrics = step_fn(state, global_batch)
        step += 1
        if pending is not None:
            _check_finite(*pending)
        pending = (step, metrics)
        first_step = step == start_step + 1
        if first_step or step % log_every == 0 or step == total_steps:
            values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
            if getattr(source, "skips", None) is not None:
                values.update(source.skips.as_dict())
            if first_step:
                log(f"compiled and ran the first step in {time.monotonic() - started:.1f}s "
                    "since start")
                progress.reset_clock(step)
            else:
                values.update(progress.rates(step))
            writer.write(step, values)
            progress.print(step, values)
        if checkpointer.is_due(step):
            _check_finite(step, metrics)  # Never save a non-finite state.
            checkpointer.maybe_save(step, state)
        due = [n for n, e in evaluators.items() if e.every_n_steps and step % e.every_n_steps == 0
               and step != total_steps]
        if due:
            run_evals(step, due)
        if deadline is not None and step < total_steps:
            reserve = (eval_seconds or 0.1 * budget) + 5.0
            if time.monotonic() + reserve > deadline:
                log(f"time budget of {budget:.0f}s reached at step {step} "
                    f"(schedule was for {total_steps}); stopping training")
                stopped_early = True
                break
        batch = next(batches)
    if pending is not None:
        _check_finite(*pending)
    checkpointer.maybe_save(step, state, force=True)
    final = run_evals(step, list(evaluators))
    checkpointer.close()
    elapsed = time.monotonic() - started
    summary = {"step": step, "stopped_early": stopped_early, "seconds": elapsed, **final}
    log(f"done: {step} steps in {elapsed:.0f}s" + "".join(
        f"; {k} = {v:.1%}" for k, v in final.items() if k.endswith("top1")))
    return summary


def _check_finite(step: int, metrics: dict) -> None:
    import jax

    if not bool(jax.device_get(metrics["finite"])):
        loss = float(jax.device_get(metrics["loss"]))
        raise NonFiniteError(f"non-finite loss or gradients at step {step} (loss={loss}); "
                             "the last good checkpoint is kept. Lower lr or check the data.")


if __name__ == "__main__":
    sys.exit(main())
