"""The training loop: data, mesh, sharded jitted steps, evaluation, logging.

One path, top to bottom (big_vision style): set up processes -> open the datasets and check they
fit the model -> build the mesh and shardings -> init or restore the state -> for each
iteration (eval_interval epochs): train steps, then evaluate -> close the run record.
"""
from __future__ import annotations

import fcntl
import math
import os
import time
import traceback
import warnings
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from kellen.data import format as fmt
from kellen.data.sampler import TrainSampler, eval_batches, num_eval_batches
from kellen.model.config import ConfigError
from kellen.model.flops import peak_tflops, train_step_flops
from kellen.train import distributed, mesh as meshlib
from kellen.train.config import PretrainConfig, trm_config
from kellen.train.evaluate import make_eval_step, normalise_eval, normalise_train
from kellen.train.progress import Progress
from kellen.train.redact import redact, redact_obj
from kellen.train.resume import Preempted, RunCheckpoints, check_resume_config, resume_note
from kellen.train.run_record import RunRecord, all_hostnames, metadata
from kellen.train.schedule import lr_multiplier
from kellen.train.step import OptimConfig, init_train_state, make_train_step
from kellen.train.telemetry import StepTimer, count_params
from kellen.train.wandb_log import WandbRun, new_run_id, resolve_mode

DEFAULT_PROJECT = "TRM-Scaling-Research"


class NonFiniteLoss(RuntimeError):
    """A NaN or inf training loss: the run stops (status failed) instead of training on."""


def check_config(cfg: PretrainConfig) -> None:
    """What the schema's types cannot say; fails before any data or device work."""
    if len(cfg.data_paths) != 1:
        raise ConfigError(f"data_paths={cfg.data_paths}: give exactly one dataset root")
    if cfg.evaluators:
        raise ConfigError("evaluators: task evaluators (ARC) are not implemented; use evaluators=[]")
    if cfg.freeze_weights:
        raise ConfigError("freeze_weights=True is not implemented")
    if cfg.eval_save_outputs:
        raise ConfigError("eval_save_outputs: saving eval outputs is not implemented; use eval_save_outputs=[]")
    if cfg.load_checkpoint:
        raise ConfigError("load_checkpoint: starting from another run's weights is not implemented; "
                          "a run resumes from its own checkpoints automatically")
    if cfg.global_batch_size < 1 or cfg.epochs < 1:
        raise ConfigError(f"global_batch_size={cfg.global_batch_size} and epochs={cfg.epochs} must be >= 1")
    per_iter = cfg.eval_interval or cfg.epochs
    if per_iter < 1 or cfg.epochs % per_iter:
        raise ConfigError(f"eval_interval={cfg.eval_interval} must divide epochs={cfg.epochs}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ConfigError(f"max_steps={cfg.max_steps} must be >= 1")


def ensure_dataset(cfg: PretrainConfig) -> None:
    """Build the configured dataset if `data_build` is set and the root is missing (one builder
    per host at a time; the build itself is atomic)."""
    root, spec = cfg.data_paths[0], cfg.data_build
    if spec is None or root.startswith("gs://") or os.path.exists(os.path.join(root, "test", "dataset.json")):
        return
    from kellen.data.cli import build_from_spec

    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    with open(os.path.abspath(root) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(root, "test", "dataset.json")):
            build_from_spec(root, spec)


def optim_config(cfg: PretrainConfig) -> OptimConfig:
    return OptimConfig(optimizer=cfg.optimizer, lr=cfg.lr, lr_min_ratio=cfg.lr_min_ratio,
                       lr_warmup_steps=cfg.lr_warmup_steps, lr_schedule=cfg.lr_schedule, beta1=cfg.beta1,
                       beta2=cfg.beta2, weight_decay=cfg.weight_decay, puzzle_emb_lr=cfg.puzzle_emb_lr,
                       puzzle_emb_weight_decay=cfg.puzzle_emb_weight_decay, ema=cfg.ema, ema_rate=cfg.ema_rate)


def local_rows(sharding, global_batch: int):
    """(index, count) of this process's contiguous block of batch rows, as the sampler wants it."""
    spans = {(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop)
             for s in sharding.addressable_devices_indices_map((global_batch, 1)).values()}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != hi - lo:
        raise ConfigError("mesh: this process's devices do not hold a contiguous block of the batch")
    return lo // (hi - lo), global_batch // (hi - lo)


def load_data(cfg: PretrainConfig):
    """(train split, test split, model config they fix); DataError names the file and key of a
    missing, corrupt or misfit dataset. `run` calls it before the run dir is touched."""
    root = cfg.data_paths[0]
    train = fmt.load_split(root, "train")
    test = fmt.load_split(cfg.data_paths_test[0] if cfg.data_paths_test else root, "test")
    meta = train.meta
    model_cfg = trm_config(cfg.arch, meta.seq_len, meta.vocab_size, meta.num_puzzle_identifiers)
    fmt.check_fits(test.meta, model_cfg, os.path.join(test.path, "dataset.json"))
    return train, test, model_cfg


class Trainer:
    def __init__(self, cfg: PretrainConfig, record: RunRecord, devices=None, data=None):
        self.cfg, self.record = cfg, record
        self.train_split, self.test_split, self.model_cfg = data or load_data(cfg)
        meta = self.train_split.meta
        self.mesh = meshlib.make_mesh(dict(cfg.mesh.axes), devices)
        meshlib.check_batch(self.mesh, cfg.mesh.data_axes, cfg.global_batch_size)
        self.epochs_per_iter = cfg.eval_interval or cfg.epochs
        self.total_iters = cfg.epochs // self.epochs_per_iter
        self.total_steps = int(cfg.epochs * meta.total_groups * meta.mean_puzzle_examples / cfg.global_batch_size)
        if self.total_steps < 1:
            raise ConfigError(f"epochs={cfg.epochs} x {meta.total_groups} groups is less than one global batch "
                              f"of {cfg.global_batch_size}")
        self.batch_sharding = meshlib.batch_sharding(self.mesh, cfg.mesh.data_axes)
        pidx, pcount = local_rows(self.batch_sharding, cfg.global_batch_size)
        self.rows = (pidx, pcount)
        self.sampler = TrainSampler(self.train_split.only_set(), meta, cfg.global_batch_size, cfg.seed,
                                    self.epochs_per_iter, pidx, pcount)
        self.opt = optim_config(cfg)
        self._build_steps()
        self.timer = StepTimer(cfg.global_batch_size, meta.seq_len, train_step_flops(self.model_cfg, cfg.global_batch_size),
                               jax.device_count(), peak_tflops(jax.devices()[0].device_kind, cfg.peak_tflops_per_device))
        self.last_metrics: Dict[str, float] = {}  # the latest logged row, for status.json and FAILED.txt
        self.step = 0

    def _build_steps(self) -> None:
        cfg, b, seq = self.cfg, self.cfg.global_batch_size, self.model_cfg.seq_len

        def init_fn(key):
            ex = {"inputs": jnp.zeros((b, seq), jnp.int32), "labels": jnp.zeros((b, seq), jnp.int32),
                  "puzzle_identifiers": jnp.zeros((b,), jnp.int32)}
            return init_train_state(self.model_cfg, self.opt, self.total_steps, key, ex)

        abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
        self.state_sharding = meshlib.state_shardings(abstract, self.mesh, cfg.mesh.data_axes, cfg.mesh.fsdp_axis,
                                                      cfg.mesh.fsdp_min_size)
        rep = meshlib.replicated(self.mesh)
        self.init_fn = jax.jit(init_fn, out_shardings=self.state_sharding)
        step = make_train_step(self.model_cfg, self.opt, self.total_steps, b, cfg.fault_nan_at_step)
        self.train_step = jax.jit(step, in_shardings=(self.state_sharding, self.batch_sharding, rep),
                                  out_shardings=(self.state_sharding, rep, rep), donate_argnums=0)
        self.compiled_step = None  # compiled ahead of the first step, to time the compile on its own
        weights_sharding = self.state_sharding["weights"]
        self.eval_step = jax.jit(make_eval_step(self.model_cfg), in_shardings=(weights_sharding, self.batch_sharding),
                                 out_shardings=rep)

    def global_batch(self, local: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
        b = self.cfg.global_batch_size
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v, (b,) + v.shape[1:])
                for k, v in local.items()}

    def init_state(self):
        return self.init_fn(jax.random.PRNGKey(self.cfg.seed))

    def lr_at(self, step: int) -> float:
        mult = lr_multiplier(self.opt.lr_schedule, step, warmup_steps=self.opt.lr_warmup_steps,
                             total_steps=self.total_steps, min_ratio=self.opt.lr_min_ratio)
        return float(self.opt.lr * mult)

    def evaluate(self, state) -> Dict[str, float]:
        weights = state["weights"]
        if self.cfg.ema:
            weights = dict(weights, params=state["ema"])
        test = self.test_split
        out = {}
        for set_name, data in test.sets.items():
            sums: Dict[str, float] = {}
            for local, _ in eval_batches(data, test.meta, self.cfg.global_batch_size, *self.rows):
                m = jax.device_get(self.eval_step(weights, self.global_batch(local)))
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            out.update(normalise_eval(sums, set_name))
        return out

    def fit(self, state, start_step: int = 0, key=None, saver=None) -> Dict[str, float]:
        """Train from `start_step` to the end (or max_steps); returns the last eval metrics.
        `saver` (kellen.train.resume.RunCheckpoints) saves and watches for preemption at step
        boundaries; it raises Preempted after saving."""
        cfg, record = self.cfg, self.record
        blocking = jax.default_backend() == "cpu"  # several in-flight CPU steps can deadlock
        key = jax.random.PRNGKey(cfg.seed) if key is None else key
        end = self.end_step()
        progress = Progress(end, start_step, enabled=record.writer, log=record.say)
        it, k = self.sampler.locate(start_step)
        step, last_eval, pending = start_step, {}, None
        self.step = step
        if start_step == 0 and cfg.eval_at_start:
            self._eval_and_log(state, 0)
        groups_per_step = cfg.global_batch_size / self.train_split.meta.mean_puzzle_examples
        while step < end:
            batch = self.global_batch(self.sampler.batch(step))
            rng = jax.random.fold_in(key, step)
            if self.compiled_step is None:
                t0 = time.perf_counter()
                self.compiled_step = self.train_step.lower(state, batch, rng).compile()
                record.log({"step": step, "perf/compile_time": round(time.perf_counter() - t0, 3)})
                self.timer.restart(step)
            state, loss, metrics = self.compiled_step(state, batch, rng)
            if blocking:
                jax.block_until_ready(loss)
            if pending is not None:  # read the previous step's metrics while this one runs
                self._log_train(*pending, progress)
            step += 1
            self.step = step
            pending = (step, metrics, groups_per_step * step / self.train_split.meta.total_groups)
            if saver is not None:
                saver.after_step(step, state, key, lambda: self._log_train(*pending, progress))
            k += 1
            if k == self.sampler.batches_in(it) or step == end:
                self._log_train(*pending, progress)
                pending = None
                if k == self.sampler.batches_in(it):
                    it, k = it + 1, 0
                    if it - 1 >= (cfg.min_eval_interval or 0) or step == end:
                        last_eval = self._eval_and_log(state, step, key, saver)
                elif step == end:
                    last_eval = self._eval_and_log(state, step, key, saver)
        if saver is not None:
            saver.finish(step, state, key)
        progress.close()
        record.sync()
        return last_eval

    def end_step(self) -> int:
        total = self.total_iters_steps()
        return total if self.cfg.max_steps is None else min(self.cfg.max_steps, total)

    def total_iters_steps(self) -> int:
        return sum(self.sampler.batches_in(i) for i in range(self.total_iters))

    def _log_train(self, step, metrics, epoch, progress) -> None:
        if (step % self.cfg.log_every and step != progress.total) or step == self._logged:
            return
        self._logged = step
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        row = {"step": step, "epoch": round(epoch, 4), **normalise_train(m, self.cfg.global_batch_size),
               "train/lr": self.lr_at(step), **self.timer.perf(step), "time": time.time()}
        self.record.log(row)
        self.last_metrics = row
        progress.update(step, row)
        if not all(math.isfinite(row[k]) for k in ("train/lm_loss", "train/q_halt_loss") if k in row):
            raise NonFiniteLoss(f"non-finite training loss at step {step}: lm_loss={row.get('train/lm_loss')} "
                                f"q_halt_loss={row.get('train/q_halt_loss')}")
        if time.time() - self._heartbeat >= self.cfg.heartbeat_seconds:
            self.heartbeat(step)

    _heartbeat = 0.0
    _logged = -1  # the last step whose train row was logged (a step is logged once)

    def heartbeat(self, step: int) -> None:
        self._heartbeat = time.time()
        self.record.status("running", step, self.end_step(), self.last_metrics)

    def _eval_and_log(self, state, step, key=None, saver=None) -> Dict[str, float]:
        t = time.time()
        metrics = self.evaluate(state)
        row = {"step": step, **metrics, "eval/seconds": round(time.time() - t, 3), "time": time.time()}
        self.record.log(row)
        self.last_metrics = dict(self.last_metrics, **row)
        self.record.say("eval step %d: %s" % (step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                                              if k.endswith(("accuracy", "lm_loss")))))
        if saver is not None:
            saver.after_eval(step, state, key, {k.rsplit("/", 1)[-1]: v for k, v in metrics.items()})
        self.record.write_derived()
        self.heartbeat(step)  # also uploads status.json; sync() below uploads the rest
        self.record.sync()
        self.timer.restart(step)  # eval time is not step time
        return metrics


def describe(trainer: Trainer) -> str:
    c, m = trainer.cfg, trainer.model_cfg
    return (f"TRM hidden={m.hidden_size} L_layers={m.L_layers} H_cycles={m.H_cycles} L_cycles={m.L_cycles} "
            f"mlp_t={m.mlp_t} | data {c.data_paths[0]} ({trainer.train_split.meta.total_groups} groups, "
            f"seq {m.seq_len}) | batch {c.global_batch_size} | {trainer.total_iters_steps()} steps "
            f"({trainer.total_steps} by the reference formula) | mesh {dict(trainer.mesh.shape)} over "
            f"{jax.device_count()} devices, {jax.process_count()} processes | "
            f"{num_eval_batches(trainer.test_split.only_set(), c.global_batch_size)} eval batches")


def start_wandb(cfg: PretrainConfig, record: RunRecord, group: str, name: str, config: Dict[str, Any],
                saved_id: Optional[str]) -> WandbRun:
    """The W&B run for this run dir (process 0): the id is kept in wandb.json (and in checkpoint
    metadata), and resume="allow" makes a restarted run continue the same W&B run."""
    import json

    stored = record.read("wandb.json")
    run_id = (json.loads(stored)["id"] if stored else None) or saved_id or new_run_id()
    mode = resolve_mode(cfg.wandb.mode)
    project = cfg.wandb.project or cfg.project_name or DEFAULT_PROJECT
    tags = [group] + [t for t in cfg.wandb.tags if t != group]
    wb = WandbRun(project=project, group=group, name=name, run_id=run_id, tags=tags, job_type=cfg.wandb.job_type,
                  config=redact_obj(config), directory=record.local, mode=mode, entity=cfg.wandb.entity,
                  notes=redact(cfg.wandb.notes) if cfg.wandb.notes else None, init_timeout=cfg.wandb.init_timeout)
    if record.writer:
        record.write_json("wandb.json", {"id": run_id, "project": project, "group": group, "name": name,
                                         "mode": mode, "entity": cfg.wandb.entity, "tags": tags})
        if wb.start():
            record.sinks.append(lambda row: wb.log(row, row["step"]) if "step" in row else None)
    return wb


def run(cfg: PretrainConfig, run_dir: str, config_yaml: str, overrides: List[str], repo: str,
        group: str = "adhoc", name: str = "run", argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Everything after Hydra: the one path from a config to a trained run."""
    check_config(cfg)
    writer = jax.process_index() == 0
    ensure_dataset(cfg)  # every host with its own disk builds its own (deterministic) copy
    data = load_data(cfg)  # a bad dataset is refused before the run dir is created or touched
    record = RunRecord(run_dir, writer)
    changed = check_resume_config(record, config_yaml)  # before any compile: refuse a changed model
    trainer = Trainer(cfg, record, data=data)
    distributed.on_peer_lost(lambda why, detail: (  # from the peer watch's thread, just before it exits
        record.write_failed(trainer.step, why, detail, trainer.last_metrics),
        record.status("failed", trainer.step, trainer.end_step(), trainer.last_metrics, reason=why)))
    hostnames = all_hostnames()
    meta = metadata(trainer.mesh, jax.process_count(), hostnames, repo)
    record.write_start(config_yaml, overrides, meta, resumed=changed is not None)
    if changed is None:
        record.write_reproduce(list(argv or []), meta["git"], meta["git"].get("remote"))
    config = yaml.safe_load(config_yaml)
    saver = RunCheckpoints(cfg, trainer, record, config)
    wb, outcome, exit_code, failing = None, "failed", 1, False

    def quietly_if_failing(write) -> None:  # a failing run's record is best effort (its disk may be full)
        try:
            write()
        except OSError:
            if not failing:
                raise

    with warnings.catch_warnings(), record.library_errors_to_log("absl", "asyncio"):  # Orbax noise: to train.log
        warnings.showwarning = lambda msg, cat, *a, **k: record.say(f"warning: {cat.__name__}: {msg}")
        try:
            state, key, start = saver.restore_or_init()
            wb = start_wandb(cfg, record, group, name, config, saver.restored_meta.get("wandb_run_id"))
            saver.wandb_run_id = wb.run_id
            num_params = count_params(state["weights"])
            record.log({"step": start, "num_params": num_params})
            wb.summary_update({"num_params": num_params})
            if writer:
                record.say(describe(trainer) + f" | {num_params:,} params")
                record.say(f"run dir {run_dir}")
            if start:
                resume_note(record, changed or [], start)
            saver.status("running", start)
            final = trainer.fit(state, start, key, saver)
            saver.status("completed", trainer.end_step())
            outcome, exit_code = "completed", 0
        except Preempted:
            outcome, exit_code = "preempted", Preempted.exit_code
            raise
        except BaseException as e:  # FAILED.txt and status.json say why, then let it propagate
            distributed.wait_if_peer_lost(e)  # a dead peer: the watch records that and exits
            failing, reason, trace = True, f"{type(e).__name__}: {e}", traceback.format_exc()
            quietly_if_failing(lambda: record.write_failed(trainer.step, reason, trace, trainer.last_metrics))
            quietly_if_failing(lambda: record.status("failed", trainer.step, trainer.end_step(), trainer.last_metrics,
                                                     reason=reason))
            raise
        finally:
            distributed.sign_off("failed" if failing else "done")  # peers stop watching this one
            try:
                quietly_if_failing(record.write_derived)
                if wb is not None:
                    wb.finish(exit_code)
            finally:
                saver.close()
                quietly_if_failing(record.close)
    return {"run_dir": run_dir, "final_eval": final, "outcome": outcome}
