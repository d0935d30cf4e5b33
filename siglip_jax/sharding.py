"""Device mesh from config, regex partition rules for parameters, global batch assembly.

The mesh is described as named axes with sizes, e.g. `[("data", -1), ("fsdp", 1)]`, where one
size may be -1 ("all remaining devices"). Parameter shardings come from an ordered list of
`(regex, rule)` pairs matched against the `/`-joined parameter path; the first match wins.
A rule is `"replicate"`, `"fsdp"` (shard the largest dimension divisible by the fsdp axis size
over that axis) or an explicit PartitionSpec-like tuple of axis names / None.

The activations' batch dimension is constrained by the models themselves
(`models.common.batch_sharded_activations`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from siglip_jax.records import ConfigError, freeze, set_fields

MeshSpec = Sequence[tuple[str, int]]
Rule = tuple[str, Any]


class ShardingError(ValueError):
    """A mesh or sharding rule that cannot be applied; the message says which and why."""


def mesh_shape(mesh_spec: MeshSpec, num_devices: int) -> dict[str, int]:
    """Axis sizes of `mesh_spec` on `num_devices` devices (one size may be -1: the rest)."""
    names = [str(name) for name, _ in mesh_spec]
    sizes = [int(size) for _, size in mesh_spec]
    if len(set(names)) != len(names):
        raise ShardingError(f"mesh axis names must be unique, got {names}")
    if sizes.count(-1) > 1:
        raise ShardingError(f"at most one mesh axis may have size -1, got {list(mesh_spec)}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if known <= 0 or num_devices % known:
        raise ShardingError(f"mesh {list(mesh_spec)} does not divide the {num_devices} devices")
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != num_devices:
        raise ShardingError(f"mesh {list(mesh_spec)} uses {int(np.prod(sizes))} devices, "
                         f"but there are {num_devices}")
    return dict(zip(names, sizes, strict=True))


def make_mesh(mesh_spec: MeshSpec, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a Mesh with the named axes of `mesh_spec`; one size may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_spec, len(devices))
    return Mesh(np.asarray(devices).reshape(list(shape.values())), tuple(shape))



@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The config's mesh section: named mesh axes (one size may be -1: the rest), the axes the
    batch is split over and the (regex, rule) parameter sharding rules, as one value."""

    axes: tuple[tuple[str, int], ...] = (("data", -1),)
    batch_axes: tuple[str, ...] = ("data",)
    rules: tuple[Rule, ...] = ((".*", "replicate"),)

    def __post_init__(self) -> None:
        try:
            axes = tuple((str(name), int(size)) for name, size in self.axes)
            rules = tuple((str(regex), freeze(rule)) for regex, rule in self.rules)
        except (TypeError, ValueError):
            raise ConfigError(f"config keys mesh / sharding_rules must be lists of pairs, got "
                              f"{self.axes!r} / {self.rules!r}") from None
        batch_axes = (self.batch_axes,) if isinstance(self.batch_axes, str) else tuple(
            str(a) for a in self.batch_axes)
        names = [name for name, _ in axes]
        missing = [a for a in batch_axes if a not in names]
        if missing:
            raise ConfigError(f"config key batch_axes names {missing[0]!r}, which is not a mesh "
                              f"axis ({', '.join(names)})")
        if not batch_axes:
            raise ConfigError("config key batch_axes is empty: name the mesh axes the batch is "
                              "split over")
        set_fields(self, axes=axes, batch_axes=batch_axes, rules=rules)


def axis_sizes(config: MeshConfig, num_devices: int) -> dict[str, int]:
    """The mesh axis sizes on `num_devices` devices; ConfigError if the mesh does not fit."""
    try:
        return mesh_shape(config.axes, num_devices)
    except ValueError as e:
        raise ConfigError(f"config key mesh: {e}") from None


def batch_shard_count(config: MeshConfig, num_devices: int) -> int:
    """How many ways the batch is split on `num_devices` devices."""
    sizes = axis_sizes(config, num_devices)
    return math.prod(sizes[a] for a in config.batch_axes)


def mesh_of(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The jax Mesh of the mesh section over `devices` (default: all devices); a one-line
    ConfigError if it does not fit them."""
    devices = list(jax.devices() if devices is None else devices)
    axis_sizes(config, len(devices))
    return make_mesh(config.axes, devices)


def batch_spec(batch_axes: Sequence[str]) -> PartitionSpec:
    """The PartitionSpec of arrays whose leading (batch) dimension is split over batch_axes."""
    return PartitionSpec(tuple(batch_axes))


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str]) -> NamedSharding:
    """NamedSharding for batch-leading arrays."""
    return NamedSharding(mesh, batch_spec(batch_axes))


def num_batch_shards(mesh: Mesh, batch_axes: Sequence[str]) -> int:
    """How many ways the batch dimension is split."""
    return int(np.prod([mesh.shape[a] for a in batch_axes]))


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh,
                      batch_axes: Sequence[str]) -> dict[str, Any]:
    """This process's share of a batch (nested dicts allowed) → global arrays on batch_axes."""
    sharding = batch_sharding(mesh, batch_axes)
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding,
                                                                         np.asarray(v)),
                        dict(local_batch))


def tree_paths(tree: optax.Params) -> list[str]:
    """The `/`-joined key path of every leaf, in tree_leaves order."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def path_names(path: Sequence[object]) -> tuple[str, ...]:
    """A jax key path as names, alike for dict keys, attributes and sequence indices."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return tuple(names)


def path_str(path: Sequence[object]) -> str:
    """Formats a jax key path as `a/b/c`."""
    return "/".join(path_names(path))


def _rule_to_spec(rule: Any, shape: Sequence[int], mesh: Mesh, path: str) -> PartitionSpec:
    if rule == "replicate" or rule is None:
        return PartitionSpec()
    if isinstance(rule, str) and rule.startswith("fsdp"):
        axis = rule.partition(":")[2] or "fsdp"
        if axis not in mesh.shape:
            raise ShardingError(f"sharding rule {rule!r} for {path!r}: mesh has no axis {axis!r} "
                             f"(axes: {tuple(mesh.shape)})")
        size = mesh.shape[axis]
        spec = [None] * len(shape)
        if size > 1:
            for dim in np.argsort(shape)[::-1]:
                if shape[dim] % size == 0 and shape[dim] >= size:
                    spec[int(dim)] = axis
                    break
        return PartitionSpec(*spec)
    if isinstance(rule, (tuple, list)):
        if len(rule) > len(shape):
            raise ShardingError(f"sharding rule {rule!r} has more entries than {path!r} has "
                             f"dimensions {tuple(shape)}")
        return PartitionSpec(*rule)
    raise ShardingError(f"unknown sharding rule {rule!r} for {path!r}; expected 'replicate', "
                     "'fsdp', 'fsdp:<axis>' or a tuple of axis names")


def param_shardings(abstract_params: optax.Params, rules: Sequence[Rule], mesh: Mesh
                    ) -> optax.Params:
    """Maps every parameter (abstract or concrete) to a NamedSharding by the first rule matching.

    Raises if a rule matches no parameter (a typo would otherwise silently replicate).
    """
    try:
        compiled = [(re.compile(pattern), rule) for pattern, rule in rules]
    except (re.error, TypeError, ValueError) as e:
        raise ShardingError(f"sharding_rules {list(rules)!r}: not (regex, rule) pairs "
                            f"with valid regexes ({e})") from None
    used = [False] * len(compiled)

    def choose(path, leaf):
        name = path_str(path)
        for i, (pattern, rule) in enumerate(compiled):
            if pattern.fullmatch(name):
                used[i] = True
                return NamedSharding(mesh, _rule_to_spec(rule, leaf.shape, mesh, name))
        return NamedSharding(mesh, PartitionSpec())

    shardings = jax.tree_util.tree_map_with_path(choose, abstract_params)
    unused = [rules[i][0] for i, u in enumerate(used) if not u]
    if unused:
        raise ShardingError(f"sharding rule regex {unused[0]!r} matches no parameter; "
                         f"parameters look like {tree_paths(abstract_params)[:3]}")
    return shardings


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def follow_params(abstract_state: optax.Params, abstract_params: optax.Params,
                  shardings: optax.Params, mesh: Mesh) -> optax.Params:
    """Shardings for optimizer state: a leaf whose path ends with a parameter's path and has
    that parameter's shape gets the parameter's sharding; anything else is replicated."""
    by_path = {}
    for (path, leaf), sharding in zip(
            jax.tree_util.tree_flatten_with_path(abstract_params)[0],
            jax.tree_util.tree_leaves(shardings), strict=True):
        by_path[path_str(path)] = (tuple(leaf.shape), sharding)

    def choose(path, leaf):
        parts = path_str(path).split("/")
        for start in range(len(parts)):
            match = by_path.get("/".join(parts[start:]))
            if match is not None and match[0] == tuple(leaf.shape):
                return match[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(choose, abstract_state)
