"""The device mesh and every sharding rule, in one place.

- Mesh: named axes from config, one of them may be -1 ("the rest"); it spans every device of
  every process. Axes are Auto, so XLA propagates shardings inside the step.
- Parameters: replicated, except arrays of at least `fsdp_min_size` elements, which are split
  along their largest dimension that the fsdp axis divides.
- Batch, and the ACT carry that travels with it: leading dimension over the data axes.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from kellen.model.config import ConfigError


def resolve_axes(axes: Dict[str, int], device_count: int, where: str = "mesh.axes") -> Dict[str, int]:
    """Sizes with the -1 filled in; ConfigError if they cannot tile `device_count` devices."""
    if not axes:
        raise ConfigError(f"{where}: needs at least one axis")
    sizes = dict(axes)
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ConfigError(f"{where}: only one axis may be -1, got {', '.join(free)}")
    for k, v in sizes.items():
        if v != -1 and (not isinstance(v, int) or v < 1):
            raise ConfigError(f"{where}.{k}={v!r} must be a positive integer or -1")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if device_count % fixed:
            raise ConfigError(f"{where}: fixed axes {fixed} do not divide the {device_count} devices")
        sizes[free[0]] = device_count // fixed
    if math.prod(sizes.values()) != device_count:
        raise ConfigError(f"{where}: shape {tuple(sizes.values())} needs {math.prod(sizes.values())} "
                          f"devices, but there are {device_count}")
    return sizes


def make_mesh(axes: Dict[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axes(axes, len(devices))
    names = tuple(sizes)
    if devices == list(jax.devices()):
        # Topology-aware order on TPU (ICI neighbours on the inner axes); all processes' devices.
        return jax.make_mesh(tuple(sizes.values()), names, axis_types=(AxisType.Auto,) * len(names))
    return Mesh(np.asarray(devices).reshape(tuple(sizes.values())), names,
                axis_types=(AxisType.Auto,) * len(names))


def data_size(mesh: Mesh, data_axes: Sequence[str]) -> int:
    return math.prod(mesh.shape[a] for a in data_axes)


def check_batch(mesh: Mesh, data_axes: Sequence[str], global_batch_size: int) -> None:
    for a in data_axes:
        if a not in mesh.shape:
            raise ConfigError(f"mesh.data_axes: '{a}' is not an axis of mesh.axes {dict(mesh.shape)}")
    n = data_size(mesh, data_axes)
    if global_batch_size % n:
        raise ConfigError(f"global_batch_size={global_batch_size} does not divide over the data axes "
                          f"{list(data_axes)} of size {n}")
    if global_batch_size % jax.process_count():
        raise ConfigError(f"global_batch_size={global_batch_size} does not divide over "
                          f"{jax.process_count()} processes")


def batch_sharding(mesh: Mesh, data_axes: Sequence[str]) -> NamedSharding:
    """Leading dimension over the data axes, the rest replicated."""
    return NamedSharding(mesh, P(tuple(data_axes)))


def param_spec(shape: Sequence[int], mesh: Mesh, fsdp_axis: str, min_size: int) -> P:
    n = mesh.shape.get(fsdp_axis, 1)
    if n == 1 or math.prod(shape) < min_size:
        return P()
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % n == 0:
            spec = [None] * len(shape)
            spec[d] = fsdp_axis
            return P(*spec)
    return P()


def state_shardings(state: Any, mesh: Mesh, data_axes: Sequence[str], fsdp_axis: str, min_size: int) -> Any:
    """Shardings for the whole train state: the carry by batch, the step replicated, and weights,
    optimizer moments and EMA by the parameter rule (moments share their parameter's shape)."""
    batch = batch_sharding(mesh, data_axes)

    def for_param(x):
        if not hasattr(x, "shape") or x.ndim == 0:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, param_spec(x.shape, mesh, fsdp_axis, min_size))

    out = {}
    for key, value in state.items():
        if key == "carry":
            out[key] = jax.tree_util.tree_map(lambda x: batch, value)
        elif key == "step":
            out[key] = NamedSharding(mesh, P())
        else:
            out[key] = jax.tree_util.tree_map(for_param, value)
    return out


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
