"""Orbax checkpoints of everything a run needs to continue exactly; local dirs and gs:// alike.

A checkpoint holds the train state (params, optimizer state, puzzle table, EMA, ACT carry, step),
the run's RNG key as raw key data, and JSON metadata (config identity, data position, versions).
Saves are async; the loop only blocks to hand the arrays over. Orbax commits a step by renaming
its temporary directory, so a half-written step is never listed and restore takes the latest
committed one. Background save errors are raised in the loop, never swallowed.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
from typing import Any, Dict, Optional

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "preempted, resumable"; the batch runner restarts on it

# Keys that may change between a run and its resume: they do not change the model, the optimizer
# or the data. Everything else must match the frozen config.yaml.
RESUMABLE_CHANGES = ("epochs", "eval_interval", "min_eval_interval", "eval_at_start", "max_steps", "log_every",
                     "checkpoint_every_steps", "checkpoint_keep", "checkpoint_every_eval", "save_checkpoint_steps",
                     "output_root", "run_name", "group", "project_name", "checkpoint_path", "load_checkpoint",
                     "compilation_cache_dir", "distributed", "mesh", "use_tpu", "num_workers", "data_build",
                     "eval_save_outputs", "heartbeat_seconds", "peak_tflops_per_device", "wandb")


def identity(config: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}


def config_hash(config: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_differences(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> list:
    """Dotted keys whose values differ in the identity part of two configs."""
    out = []
    a, b = (identity(old), identity(new)) if not prefix else (old, new)
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += config_differences(a[k], b[k], key + ".")
        elif a.get(k) != b.get(k):
            out.append(key)
    return out


def _key_name(path) -> str:
    parts = []
    for p in path:
        parts.append(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))))
    return "__".join(parts)  # not ".": Orbax reads dots in names as nesting


def flatten(tree) -> Dict[str, Any]:
    """{path joined by "__": leaf}: Orbax restores plain dicts onto target shardings on every process,
    where NamedTuples (the ACT carry, optax states) would lose them."""
    return {_key_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten(flat: Dict[str, Any], like):
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[_key_name(p)] for p, _ in paths])


class Checkpointer:
    def __init__(self, directory: str, every_steps: Optional[int], keep: int):
        save_policies = [policies.PreemptionCheckpointingPolicy()]  # keep Orbax's preemption save
        if every_steps:
            save_policies.append(policies.FixedIntervalPolicy(every_steps))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy(save_policies),
            preservation_policy=policies.AnyPreservationPolicy([
                policies.LatestN(n=keep),
                policies.BestN(get_metric_fn=lambda m: m["exact_accuracy"], n=1,
                               keep_checkpoints_without_metrics=False),
            ]),
            enable_async_checkpointing=True,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.directory = directory
        self.manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state, rng_data, meta: Dict[str, Any], metrics: Optional[Dict[str, float]] = None,
             force: bool = False) -> bool:
        """Start an async save (if the policy or `force` says so); raises a previous save's error."""
        self.manager.check_for_errors()
        saved = self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"train": flatten(state), "rng": rng_data}),
            meta=ocp.args.JsonSave(meta)), metrics=metrics, force=force)
        return saved

    def restore(self, step: int, abstract_state, abstract_rng):
        """Restore onto the shardings in the abstract targets (any mesh or device count)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"train": flatten(abstract_state), "rng": abstract_rng}),
            meta=ocp.args.JsonRestore()))
        return unflatten(out.state["train"], abstract_state), out.state["rng"], out.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self.manager.check_for_errors()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs with the target shardings: what Orbax restores onto."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class PreemptionWatch:
    """True at a step boundary once this run should stop and save: SIGTERM in a single process, or
    JAX's preemption sync point (all processes agree on the step) after jax.distributed init."""

    def __init__(self):
        self.flag = False
        self.multi = jax.process_count() > 1
        if not self.multi:
            self._old = signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, *_):
        self.flag = True

    def __call__(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.flag

    def close(self) -> None:
        if not self.multi:
            signal.signal(signal.SIGTERM, self._old)


def write_status(run_dir_local: str, state: str, step: int) -> None:
    import time

    path = os.path.join(run_dir_local, "status.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"state": state, "step": step, "time": time.time()}, f)
    os.replace(path + ".tmp", path)
