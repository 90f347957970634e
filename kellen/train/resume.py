"""Auto-resume, periodic and eval saves, and preemption for one run.

- Start: if the run's checkpoint dir holds a committed step, every process restores its shards
  of the latest one (onto this run's mesh) and training continues from there, seeing exactly the
  batches and RNG an uninterrupted run would. The frozen config.yaml guards the resume.
- Steps: the Orbax policy saves every `checkpoint_every_steps`; at each eval (best kept by
  exact_accuracy) and at the end a save is forced.
- Preemption: at the first step boundary after SIGTERM (or JAX's preemption sync point on a pod)
  every process saves, the status file says `preempted`, and the run exits with code 75.
- Each checkpoint's metadata carries the W&B run id, so a resumed run logs to the same W&B run
  even if the run dir's wandb.json is gone.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import jax
import numpy as np
import yaml

from kellen.model.config import ConfigError
from kellen.train import checkpoint as ck, mesh as meshlib
from kellen.train.redact import redact
from kellen.train.run_record import versions


class Preempted(Exception):
    exit_code = ck.PREEMPTED_EXIT_CODE

    def __init__(self, step: int):
        super().__init__(f"preempted at step {step}; the run resumes from this step when started again")
        self.step = step


def check_resume_config(record, config_yaml: str) -> Optional[list]:
    """None for a new run; else the allowed keys that changed. Refuses identity changes by name."""
    frozen_text = record.read("config.yaml")
    if frozen_text is None:
        return None
    # The frozen copy was written redacted; compare like with like.
    old, new = yaml.safe_load(frozen_text), yaml.safe_load(redact(config_yaml))
    bad = ck.config_differences(old, new)
    if bad:
        raise ConfigError(f"{record.root}/config.yaml: resuming with a different " + ", ".join(bad) +
                          " (these change the model, optimizer or data; start a new run_name instead)")
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


class RunCheckpoints:
    def __init__(self, cfg, trainer, record, config: Dict[str, Any]):
        self.trainer, self.record = trainer, record
        directory = cfg.checkpoint_path or f"{record.root}/checkpoints"
        if not directory.startswith("gs://"):
            directory = os.path.abspath(directory)  # Orbax refuses relative paths (output_root=runs)
        every = cfg.checkpoint_every_steps or cfg.save_checkpoint_steps
        self.ckpt = ck.Checkpointer(directory, every, cfg.checkpoint_keep)
        self.every_eval = cfg.checkpoint_every_eval
        self.config_hash = ck.config_hash(config)
        self.preempt = ck.PreemptionWatch()
        self.last_saved = None
        self.restored_meta: Dict[str, Any] = {}  # the restored checkpoint's metadata (W&B id, ...)
        self.wandb_run_id: Optional[str] = None  # saved with each checkpoint

    def restore_or_init(self):
        """(state, key, start step): the latest committed checkpoint, or a fresh state."""
        t = self.trainer
        latest = self.ckpt.latest_step()
        key = jax.random.PRNGKey(t.cfg.seed)
        if latest is None:
            return t.init_state(), key, 0
        abstract = jax.eval_shape(t.init_state)
        target = ck.abstract_like(abstract, t.state_sharding)
        key_data = jax.random.key_data(key)
        rng_target = jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=meshlib.replicated(t.mesh))
        state, rng, meta = self.ckpt.restore(latest, target, rng_target)
        if meta.get("config_hash") != self.config_hash:
            raise ConfigError(f"{self.ckpt.directory}: checkpoint {latest} was written by a different config "
                              f"(hash {meta.get('config_hash')} vs {self.config_hash})")
        self.last_saved, self.restored_meta = latest, meta
        return state, rng, latest

    def _meta(self, step: int) -> Dict[str, Any]:
        it, k = self.trainer.sampler.locate(step)
        return {"step": step, "config_hash": self.config_hash, "data_position": {"iteration": it, "batch": k},
                "versions": versions(), "wandb_run_id": self.wandb_run_id}

    def _save(self, step, state, key, metrics=None, force=False) -> None:
        if step == self.last_saved:
            return
        if self.ckpt.save(step, state, self._global_rng(key), self._meta(step), metrics, force):
            self.last_saved = step

    def _global_rng(self, key):
        """Raw key data as a replicated global array: every process holds it, Orbax can save it."""
        data = np.asarray(jax.random.key_data(key))
        return jax.make_array_from_callback(data.shape, meshlib.replicated(self.trainer.mesh), lambda i: data[i])

    def after_step(self, step: int, state, key, flush) -> None:
        """`flush` logs the step's train row, whose NaN/inf check stops the run: done before a save
        of this step, so a diverged state is never saved, and before a preemption exit."""
        if self.ckpt.due(step):
            flush()
        self._save(step, state, key)
        if self.preempt(step):
            flush()
            self._save(step, state, key, force=True)
            self.ckpt.wait()
            self.status("preempted", step)
            raise Preempted(step)

    def after_eval(self, step: int, state, key, metrics: Dict[str, float]) -> None:
        if self.every_eval:
            self._save(step, state, key, metrics, force=True)

    def finish(self, step: int, state, key) -> None:
        self._save(step, state, key, force=True)
        self.ckpt.wait()

    def status(self, state: str, step: int) -> None:
        self.record.status(state, step, self.trainer.end_step(), self.trainer.last_metrics)

    def close(self) -> None:
        self.preempt.close()
        self.ckpt.close()


def resume_note(record, changed, step: int) -> None:
    if changed:
        record.log({"resume": {"step": step, "changed": changed}})
    if record.writer:
        print(f"resuming from step {step}" + (f" (changed: {', '.join(changed)})" if changed else ""), flush=True)
