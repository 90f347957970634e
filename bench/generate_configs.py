"""Benchmark: a 1,000-run group (10 x 10 x 10 grid, a derived lr, a data prerequisite) loaded,
expanded, validated and written as 1,000 configs/<run>.yaml into a temp copy of configs/.

    .venv/bin/python bench/generate_configs.py [--side 10] [--repeat 3]

Timed in this process (best of --repeat, each on a fresh out dir) and once as a fresh
`python -m kellen.experiments.generate generate --all` process (imports included). Goal: <= 5 s.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)

SPEC = """id: exp99
name: synthetic 1,000-run grid
wandb_project: TRM-Bench
storage_root: gs://bench-bucket
tags: [bench]
data: {{kind: sudoku, csv: data/raw/sudoku-extreme, subsample_size: 1000, num_aug: 1000, root: gs://bench-bucket/data}}
fixed:
  epochs: 50000
  eval_interval: 5000
  arch: {{mlp_t: true, loss: {{loss_type: softmax_cross_entropy}}}}
variables:
  grid:
    global_batch_size: {bs}
    arch.L_cycles: {cycles}
    data.seed: {seeds}
derived:
  lr: 1e-4 * sqrt(global_batch_size / 6144)
baseline: 0
success_criteria: [eval/all/exact_accuracy >= 0.85 for baseline]
"""


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def fresh_tree(root: str, side: int) -> str:
    configs = os.path.join(root, "configs")
    os.makedirs(os.path.join(configs, "experiments"))
    shutil.copy(os.path.join(REPO, "configs", "cfg_pretrain.yaml"), configs)
    shutil.copytree(os.path.join(REPO, "configs", "arch"), os.path.join(configs, "arch"))
    r = list(range(side))
    with open(os.path.join(configs, "experiments", "exp99.yaml"), "w") as f:
        f.write(SPEC.format(bs=[256 * (i + 1) for i in r], cycles=[i + 1 for i in r], seeds=r))
    return configs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", type=int, default=10, help="values per grid axis (runs = side^3)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    t0 = time.perf_counter()
    from kellen.experiments import generate as gen
    from kellen.experiments.spec import load_all
    t_import = time.perf_counter() - t0

    rows = {"load+expand+validate": [], "generate (write all)": [], "regenerate (no change)": [],
            "check (no change)": []}
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            configs = fresh_tree(tmp, args.side)
            spec_dir = os.path.join(configs, "experiments")
            t = time.perf_counter()
            groups = load_all(spec_dir)
            rows["load+expand+validate"].append(time.perf_counter() - t)
            runs = len(groups["exp99"].runs)
            for key, kw in (("generate (write all)", {}), ("regenerate (no change)", {}),
                            ("check (no change)", {"check": True})):
                t = time.perf_counter()
                report = gen.generate(None, spec_dir, configs, **kw)
                rows[key].append(time.perf_counter() - t)
            assert not report.errors and len(report.unchanged) == runs + 1, report.lines()[-1]
            written = len([e for e in os.listdir(configs) if e.startswith("exp99_")])
            assert written == runs, written
    with tempfile.TemporaryDirectory() as tmp:
        configs = fresh_tree(tmp, args.side)
        cmd = [sys.executable, "-m", "kellen.experiments.generate", "generate", "--all", "--spec-dir",
               os.path.join(configs, "experiments"), "--out", configs]
        t = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        cli = time.perf_counter() - t

    print(f"machine: {machine()}")
    print(f"runs: {runs} ({args.side} x {args.side} x {args.side} grid), best of {args.repeat}; "
          f"import {t_import:.2f} s")
    for key, times in rows.items():
        print(f"  {key:26s} {min(times):6.2f} s  ({runs / min(times):,.0f} runs/s)")
    print(f"  {'CLI, fresh process':26s} {cli:6.2f} s  (python -m kellen.experiments.generate generate --all)")
    print(f"goal <= 5 s for load+validate+generate: {'met' if cli <= 5 else 'MISSED'}")


if __name__ == "__main__":
    main()
