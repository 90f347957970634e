#!/usr/bin/env python
"""Run one experiment config to completion, with optional Hydra overrides; never asks anything.

    python kellen/experiments/run_experiment.py exp03_a                  # the canonical run
    python kellen/experiments/run_experiment.py exp03_a epochs=10000     # run exp03_a--epochs=10000
    python kellen/experiments/run_experiment.py exp03_a epochs=10000 --dry-run   # show the config
    python kellen/experiments/run_experiment.py exp03_a --tmux           # detached in tmux

Overrides make a distinct run (`<name>--key=value`), so they never resume or overwrite the
canonical run. The same command again resumes a preempted run and skips a completed one
(--rerun starts it afresh as <name>--rerunK). It is a batch of one: the run's console is shown
and also kept in <output root>/_batches/<batch id>/. Exit code: 0 completed (or already done), 75 preempted
or interrupted, 1 failed or blocked, 2 bad arguments (a missing config, overrides
that do not compose: one line on stderr, nothing written).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

if __package__ in (None, ""):  # run as a script: make `kellen` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kellen.experiments.run_experiment_batch import (  # noqa: E402
    add_common, check_overrides, make_launcher, normalise_roots, script_main, tmux_relaunch)
from kellen.experiments.runs import RunError, Selection  # noqa: E402

PROG = "run_experiment.py"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="config name: configs/NAME.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides (make a distinct run)")
    add_common(p)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """`kellen run NAME [KEY=VALUE ...]`"""
    p = subparsers.add_parser("run", help="run one experiment config (resume if preempted, skip if done)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(fn=lambda args: run_args(args, sys.argv[2:], prog="kellen run"))
    return p


def show_config(name: str, overrides, args) -> int:
    """--dry-run: the config composed through Hydra, where its record goes, and what would happen."""
    from omegaconf import OmegaConf

    from kellen.experiments import batch, runs

    target = runs.resolve(name, overrides, config_dir=args.config_dir, output_root=args.output_root)
    cfg = runs.compose(target)
    target = runs.with_values(target, OmegaConf.to_container(cfg, resolve=True))
    print(OmegaConf.to_yaml(cfg, resolve=True).rstrip())
    print(f"# run {target.name} (group {target.group})")
    print(f"# run dir {target.run_dir}")
    print(f"# command: {shlex.join(['python', 'pretrain_jax.py', *target.pretrain_argv()])}")
    plan = batch.decide(target, stale_after_s=args.stale_after, retry_failed=args.retry_failed, rerun=args.rerun,
                        config_dir=args.config_dir, output_root=args.output_root)
    print(f"# plan: {plan.describe()}")
    return 1 if plan.decision == "blocked" else 0


def run_args(args, argv: list, prog: str = PROG) -> int:
    from kellen.experiments import batch, runs

    try:
        normalise_roots(args)
        runs.check_name(args.name, "config name")
        overrides = [runs.check_override(o) for o in args.overrides]
        if args.dry_run:
            return show_config(args.name, overrides, args)
        runs.resolve(args.name, [], config_dir=args.config_dir)  # a missing config is a bad argument
        check_overrides([args.name], overrides, args.config_dir, args.output_root)
        if args.tmux is not None:
            return tmux_relaunch(args, argv, __file__, args.name)
        launcher = make_launcher(args, echo=True)
    except RunError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return batch.run_batch(Selection(names=[args.name], overrides=overrides), launcher, retries=args.retries,
                           rerun=args.rerun, retry_failed=args.retry_failed, output_root=args.output_root,
                           config_dir=args.config_dir, logs_dir=args.logs_dir, stale_after_s=args.stale_after,
                           argv=[sys.executable, os.path.abspath(__file__), *argv])


def main(argv=None) -> int:
    return script_main(PROG, __doc__, add_arguments, run_args, argv)


if __name__ == "__main__":
    sys.exit(main())
