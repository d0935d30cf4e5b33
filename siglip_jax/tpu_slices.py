"""TPU slices by their gcloud names, their chips' published facts, and compile-only devices.

`parse_slice("v4-256")` → a `Slice`: 128 chips of TPU v4, topology "v4:4x4x8", megacore
(one JAX device per chip, as on a real v4 VM). `compile_only_devices("v4-256")` asks libtpu
(`pip install libtpu`) for devices of that topology that can compile but not run, so a step
built on a mesh of them is compiled by the real TPU compiler on any machine, no TPU attached.

Naming (Cloud TPU docs): v4-N and v5p-N count TensorCores, two per chip (N/2 chips);
v5litepod-N (alias v5e-N) and v6e-N count chips. The default topology of a chip count is the
most cube-like power-of-two shape (v4-32 = 16 chips = 2x2x4, v5litepod-16 = 4x4), which is
what gcloud creates for those accelerator types; an explicit topology ("v4:2x2x3") is also
accepted.

Importing JAX with libtpu installed makes JAX try the TPU backend first (≈1.6 s of warnings
and a lock on /tmp/libtpu_lockfile) unless the platform is chosen: set `JAX_PLATFORMS=cpu`
before JAX starts. The compile-only topology then still works: `compile_only_devices` loads
the TPU plugin itself, with environment defaults that keep libtpu quiet and let several
processes on one machine use it (only when no TPU chip is attached to this machine).

The module stays light (JAX is imported only by `compile_only_devices`): the command-line
entry points use it before JAX starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import math
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jax

GiB = 1024**3
GB = 10**9


def format_bytes(n: float) -> str:
    """Bytes as the planner prints HBM sizes and memory: "31.25 GiB", or "12.0 MiB" below
    one GiB."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: memory, compute and bandwidths per chip, naming and hosts."""

    kind: str  # Key of metrics.PEAK_FLOPS_PER_CHIP (lower-cased device_kind prefix).
    label: str
    hbm_bytes: int
    cores_per_chip: int  # The N in "v4-N" counts TensorCores (2 per chip on v4/v5p).
    chips_per_host: int
    source: str
    peak_flops: float = 0.0  # Dense bf16 FLOP/s per chip.
    hbm_bytes_per_s: float = 0.0
    ici_bytes_per_s: float = 0.0  # Per chip, all links, one direction summed over links.
    topology_prefix: str = ""  # libtpu's name: "v4", "v5e", "v5p", "v6e".
    dims: int = 3  # 3-D torus (v4, v5p) or 2-D (v5e, v6e).
    chip_config: str | None = None  # "megacore": one device per chip (two cores fused).


# Published per-chip facts (Cloud TPU documentation, retrieved 2026):
#   v4  https://cloud.google.com/tpu/docs/v4  : 275 TFLOP/s bf16; HBM2 32 GiB, 1200 GBps.
#       ICI: 6 links per chip (3-D torus) of ~50 GB/s each per direction (TPU v4 paper,
#       Jouppi et al. 2023, arXiv:2304.01433) → 300 GB/s per chip, an approximate figure.
#   v5e https://cloud.google.com/tpu/docs/v5e : 197 TFLOP/s bf16; 16 GB, 819 GBps;
#       ICI 1600 Gbps per chip (= 200 GB/s).
#   v5p https://cloud.google.com/tpu/docs/v5p : 459 TFLOP/s bf16; 95 GB, 2765 GBps;
#       ICI 4800 Gbps per chip (= 600 GB/s).
#   v6e https://cloud.google.com/tpu/docs/v6e : 918 TFLOP/s bf16; 32 GB, 1640 GBps (the
#       comparison table rounds to 1600); ICI 3200 Gbps per chip (= 400 GB/s).
# "GB" on the v5e/v5p/v6e pages is read as 10^9 bytes (the conservative reading).
CHIPS: dict[str, Chip] = {
    "v4": Chip("tpu v4", "TPU v4", 32 * GiB, 2, 4, "https://cloud.google.com/tpu/docs/v4",
               275e12, 1200 * GB, 300 * GB, "v4", 3, "megacore"),
    "v5e": Chip("tpu v5e", "TPU v5e", 16 * GB, 1, 8, "https://cloud.google.com/tpu/docs/v5e",
                197e12, 819 * GB, 200 * GB, "v5e", 2, None),
    "v5p": Chip("tpu v5p", "TPU v5p", 95 * GB, 2, 4, "https://cloud.google.com/tpu/docs/v5p",
                459e12, 2765 * GB, 600 * GB, "v5p", 3, "megacore"),
    "v6e": Chip("tpu v6e", "TPU v6e", 32 * GB, 1, 8, "https://cloud.google.com/tpu/docs/v6e",
                918e12, 1640 * GB, 400 * GB, "v6e", 2, None),
}
ALIASES = {"v5litepod": "v5e"}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice: its gcloud name, chip, chip count, hosts and libtpu topology."""

    name: str
    chip: Chip
    chips: int
    hosts: int
    topology: str  # libtpu topology string, e.g. "v4:2x2x4".
    chip_config: str | None


class SliceError(ValueError):
    """A slice name that does not describe a TPU slice."""


def default_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The most cube-like power-of-two shape of `chips` chips in `dims` dims (1s last)."""
    if chips < 1 or chips & (chips - 1):
        raise SliceError(f"{chips} chips is not a power of two; give the topology explicitly, "
                         "e.g. v4:2x2x3")
    shape = [1] * dims
    while math.prod(shape) < chips:
        shape[shape.index(min(shape))] *= 2
    return tuple(sorted(shape, key=lambda n: (n == 1, n)))  # 2x2x1, as gcloud names it.


def parse_slice(name: str) -> Slice:
    """"v4-256" → 128 v4 chips as "v4:4x4x8"; also v5litepod-N/v5e-N, v5p-N, v6e-N, "v4:2x2x1"."""
    text = name.strip().lower()
    explicit = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", text)
    counted = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if not (explicit or counted):
        raise SliceError(f"TPU slice {name!r} is not of the form v4-32, v5litepod-16, v5p-128, "
                         "v6e-64 or v4:2x2x4")
    m = explicit or counted
    gen = ALIASES.get(m.group(1), m.group(1))
    if gen not in CHIPS:
        raise SliceError(f"TPU slice {name!r}: unknown TPU generation {m.group(1)!r}; known: "
                         f"{', '.join(sorted(CHIPS))} (and v5litepod)")
    chip = CHIPS[gen]
    if explicit:
        shape = tuple(int(s) for s in m.group(2).split("x"))
        if len(shape) != chip.dims or min(shape) < 1:
            raise SliceError(f"TPU slice {name!r}: {gen} topologies have {chip.dims} positive "
                             "dimensions")
        chips = math.prod(shape)
    else:
        count = int(m.group(2))
        if count < 1 or count % chip.cores_per_chip:
            raise SliceError(f"TPU slice {name!r}: {m.group(1)}-N counts TensorCores, "
                             f"{chip.cores_per_chip} per chip, so N must be a positive "
                             f"multiple of {chip.cores_per_chip}")
        chips = count // chip.cores_per_chip
        shape = default_shape(chips, chip.dims)
    topology = f"{chip.topology_prefix}:{'x'.join(str(s) for s in shape)}"
    hosts = max(1, math.ceil(chips / chip.chips_per_host))
    return Slice(name, chip, chips, hosts, topology, chip.chip_config)


def tpu_attached() -> bool:
    """Whether this machine has TPU chips (the device files a TPU VM exposes)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def libtpu_env_defaults() -> None:
    """Environment defaults for libtpu on a machine without TPU chips (before it loads)."""
    if tpu_attached():
        return
    # Without a TPU VM's metadata libtpu warns about these; any valid value silences it and
    # the compile target is the explicit topology, not this accelerator type.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Compile-only use needs no exclusive lock on the (absent) chips; without this a second
    # process on the machine fails with "Internal error when accessing libtpu lockfile".
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def libtpu_version() -> str | None:
    """The installed libtpu version, or None when libtpu is not installed."""
    from importlib import metadata

    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def cpu_backend_flags_hidden() -> Iterator[None]:
    """XLA_FLAGS without the CPU backend's flags (`--xla_cpu_*`) inside the block, restored
    after it.

    libtpu parses XLA_FLAGS once, on its first compile, and aborts the process on a flag its
    own XLA does not define. That includes CPU flags of the installed jaxlib (libtpu 0.0.52
    rejects `--xla_cpu_use_fusion_emitters`, which tests/conftest.py sets); they mean nothing
    to the TPU compiler. The CPU backend parses its own copy once, as it starts: started
    before the block, it keeps them.
    """
    saved = os.environ.get("XLA_FLAGS")
    if saved is None:
        yield
        return
    os.environ["XLA_FLAGS"] = " ".join(f for f in saved.split() if not f.startswith("--xla_cpu_"))
    try:
        yield
    finally:
        os.environ["XLA_FLAGS"] = saved


def compile_only_devices(name: str | Slice) -> list[jax.Device]:
    """Compile-only JAX devices of a TPU slice (needs libtpu; no TPU attached is needed)."""
    spec = parse_slice(name) if isinstance(name, str) else name
    if libtpu_version() is None:
        raise SliceError(f"compiling for {spec.name} needs libtpu: pip install libtpu")
    libtpu_env_defaults()
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    kwargs = {"chip_config_name": spec.chip_config} if spec.chip_config else {}
    jax.devices()  # The default (CPU) backend parses XLA_FLAGS as it starts: with its flags.
    with cpu_backend_flags_hidden():
        topo = topologies.get_topology_desc(spec.topology, "tpu", **kwargs)
        devices = list(topo.devices)
        # libtpu reads XLA_FLAGS on its first compile (in this process): this one, while the
        # CPU flags are hidden; later compiles, with XLA_FLAGS restored, do not read it again.
        one = jax.sharding.SingleDeviceSharding(devices[0])
        jax.jit(jnp.negative).lower(jax.ShapeDtypeStruct((), jnp.float32, sharding=one)).compile()
    if len(devices) != spec.chips:
        raise SliceError(f"libtpu gave {len(devices)} devices for {spec.topology}, expected "
                         f"{spec.chips} (one per chip)")
    return devices
