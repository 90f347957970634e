"""Persistent compilation cache: cold vs warm time-to-first-step of the training step.

For each config, runs the same program in two fresh subprocesses that share one cache
directory: the first starts with an empty directory (cold), the second finds the entries
the first wrote (warm). Each child sets

    jax_compilation_cache_dir                   = DIR
    jax_persistent_cache_min_compile_time_secs  = 0
    jax_persistent_cache_min_entry_size_bytes   = 0

and times, from the start of the step-building code (before `import jax`) to the first
step's outputs being ready: import, state init (its small eager computations compile and
are cached too), trace+lower, compile (a cache read when warm), and the first step's run.

Usage:
  python bench/compile_cache.py [--configs cpu,paper] [--paper-batch 8] [--cache-root DIR] [--repeats 1]

Configs:
  cpu    B=64, hidden 128, 8 heads, H3/L6, L_layers 2, attention+RoPE, float32, AdamW
  paper  hidden 512, 8 heads, H3/L6, L_layers 2, attention+RoPE, bfloat16, adam_atan2 + EMA;
         the paper's global batch is 768, but one step at 768 runs for many minutes on a
         2-core CPU, so the default here is --paper-batch 8 (the compiled program has the same
         ops; only the run time of the first step scales with the batch).
Both use seq_len 81, vocab 11, a 16-token puzzle prefix and 1 puzzle identifier.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

CONFIGS = {
    "cpu": dict(hidden_size=128, dtype="float32", optimizer="adamw", ema=False, batch=64),
    "paper": dict(hidden_size=512, dtype="bfloat16", optimizer="adam_atan2", ema=True, batch=None),
}


def child(config: str, batch: int, cache_dir: str) -> None:
    t_start = time.perf_counter()
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    events = {}

    def listener(event, **kwargs):
        if "compilation_cache" in event:
            events[event] = events.get(event, 0) + 1

    jax.monitoring.register_event_listener(listener)

    from kellen.model.config import TRMConfig
    from kellen.train.step import OptimConfig, init_train_state, make_train_step

    t_import = time.perf_counter()
    c = CONFIGS[config]
    cfg = TRMConfig(seq_len=81, vocab_size=11, num_puzzle_identifiers=1, H_cycles=3, L_cycles=6,
                    L_layers=2, hidden_size=c["hidden_size"], num_heads=8, puzzle_emb_len=16,
                    pos_encodings="rope", mlp_t=False, forward_dtype=c["dtype"])
    opt = OptimConfig(optimizer=c["optimizer"], ema=c["ema"])
    total_steps = 100_000
    key = jax.random.PRNGKey(0)
    labels = jax.random.randint(key, (batch, cfg.seq_len), 2, cfg.vocab_size, jnp.int32)
    inputs = jnp.where(jax.random.uniform(jax.random.fold_in(key, 1), labels.shape) < 0.7, 1, labels)
    data = {"inputs": inputs, "labels": labels, "puzzle_identifiers": jnp.zeros((batch,), jnp.int32)}
    state = init_train_state(cfg, opt, total_steps, key, data)
    state = jax.tree.map(lambda x: x.copy(), state)  # z_H and z_L share a buffer; donation needs two
    jax.block_until_ready(state)
    t_init = time.perf_counter()

    step = jax.jit(make_train_step(cfg, opt, total_steps, batch), donate_argnums=0)
    lowered = step.lower(state, data, jax.random.PRNGKey(1))
    t_lower = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter()
    state, loss, _ = compiled(state, data, jax.random.PRNGKey(1))
    jax.block_until_ready((state, loss))
    t_step = time.perf_counter()

    print(json.dumps({
        "import_s": t_import - t_start, "init_s": t_init - t_import, "lower_s": t_lower - t_init,
        "compile_s": t_compile - t_lower, "first_step_s": t_step - t_compile,
        "time_to_first_step_s": t_step - t_start, "loss": float(loss), "events": events,
    }))


def run_child(config: str, batch: int, cache_dir: str) -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", config,
                          "--batch", str(batch), "--cache-dir", cache_dir],
                         env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"child {config} failed with {out.returncode}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = wall
    res["ready_s"] = res["time_to_first_step_s"] - res["first_step_s"]  # executable ready, before running it
    return res


def dir_stats(path: str) -> tuple:
    n, size = 0, 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            n += 1
            size += os.path.getsize(os.path.join(root, f))
    return n, size


def fmt(r: dict) -> str:
    hits = r["events"].get("/jax/compilation_cache/cache_hits", 0)
    misses = r["events"].get("/jax/compilation_cache/cache_misses", 0)
    return (f"import {r['import_s']:5.2f}  init {r['init_s']:5.2f}  lower {r['lower_s']:5.2f}  "
            f"compile {r['compile_s']:6.2f}  first step {r['first_step_s']:6.2f}  "
            f"=> time-to-first-step {r['time_to_first_step_s']:6.2f}s (process {r['process_wall_s']:6.2f}s; "
            f"cache hits {hits}, misses {misses})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="cpu,paper")
    ap.add_argument("--paper-batch", type=int, default=8)
    ap.add_argument("--cache-root", default=None, help="parent of the per-config cache dirs (default: a temp dir)")
    ap.add_argument("--repeats", type=int, default=1, help="cold/warm pairs per config (fresh dir each)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        child(args.child, args.batch, args.cache_dir)
        return

    root = args.cache_root or tempfile.mkdtemp(prefix="kellen_jax_cache_")
    print(f"python {sys.version.split()[0]}  cpus={os.cpu_count()}  cache root {root}")
    summary = []
    for config in args.configs.split(","):
        batch = CONFIGS[config]["batch"] or args.paper_batch
        colds, warms = [], []
        for rep in range(args.repeats):
            cache_dir = os.path.join(root, f"{config}_{rep}")
            shutil.rmtree(cache_dir, ignore_errors=True)
            os.makedirs(cache_dir)
            cold = run_child(config, batch, cache_dir)
            n, size = dir_stats(cache_dir)
            warm = run_child(config, batch, cache_dir)
            print(f"\n{config} (batch {batch}) pair {rep + 1}: cache dir {cache_dir}: {n} entries, {size / 1e6:.2f} MB after cold run")
            print(f"  cold: {fmt(cold)}")
            print(f"  warm: {fmt(warm)}")
            colds.append(cold)
            warms.append(warm)
        med = lambda rs, k: statistics.median(r[k] for r in rs)
        summary.append((config, batch, med(colds, "time_to_first_step_s"), med(warms, "time_to_first_step_s"),
                        med(colds, "compile_s"), med(warms, "compile_s"),
                        med(colds, "first_step_s"), med(warms, "first_step_s"),
                        med(colds, "ready_s"), med(warms, "ready_s")))

    print(f"\nsummary (medians of {args.repeats} cold/warm pairs; goal warm <= 25% of cold; 'ready' = "
          f"time-to-first-step minus the first step's own run, i.e. until the executable is ready):")
    for config, batch, cold, warm, cc, wc, cs, ws, rc, rw in summary:
        print(f"  {config:5s} B={batch:<4d} time-to-first-step cold {cold:6.2f}s  warm {warm:6.2f}s  "
              f"warm/cold {100 * warm / cold:5.1f}% ({'meets' if warm <= 0.25 * cold else 'misses'} goal) | "
              f"ready cold {rc:6.2f}s warm {rw:5.2f}s = {100 * rw / rc:5.1f}% | "
              f"compile cold {cc:6.2f}s warm {wc:5.2f}s | first step run cold {cs:5.2f}s warm {ws:5.2f}s")


if __name__ == "__main__":
    main(sys.argv[1:])
