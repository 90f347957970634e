"""Process setup that must happen before JAX touches a backend: multi-process init and the
persistent compilation cache."""
from __future__ import annotations

import os

from kellen.model.config import ConfigError


def _env_int(name: str):
    v = os.environ.get(name)
    if v in (None, ""):
        return None
    try:
        return int(v)
    except ValueError:
        raise ConfigError(f"environment {name}={v!r} must be an integer") from None


def on_tpu_pod() -> bool:
    """A multi-host TPU slice announces its workers in the environment."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize(dist) -> None:
    """jax.distributed from config or KELLEN_* env; automatic on a TPU pod; else single process."""
    import jax

    cpu_devices = dist.cpu_devices_per_process or _env_int("KELLEN_CPU_DEVICES")
    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    coordinator = dist.coordinator_address or os.environ.get("KELLEN_COORDINATOR")
    num = dist.num_processes if dist.num_processes is not None else _env_int("KELLEN_NUM_PROCESSES")
    pid = dist.process_id if dist.process_id is not None else _env_int("KELLEN_PROCESS_ID")
    if jax.distributed.is_initialized():
        return
    if coordinator:
        if num is None or pid is None:
            raise ConfigError("distributed.coordinator_address needs distributed.num_processes and "
                              "distributed.process_id (or KELLEN_NUM_PROCESSES / KELLEN_PROCESS_ID)")
        if not 0 <= pid < num:
            raise ConfigError(f"distributed.process_id={pid} must be in [0, {num})")
        jax.distributed.initialize(coordinator, num, pid)
    elif dist.auto and on_tpu_pod():
        jax.distributed.initialize()


def enable_compilation_cache(path) -> None:
    """Persistent XLA compilation cache (local dir or gs://); None leaves it off."""
    if not path:
        return
    import jax

    if not path.startswith("gs://"):
        path = os.path.expanduser(path)
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
