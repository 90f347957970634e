#!/usr/bin/env python
"""Run a batch of experiment configs one after another, skipping finished runs and resuming
preempted ones; never asks anything.

    python kellen/experiments/run_experiment_batch.py --pattern exp03            # exp03 and exp03_*
    python kellen/experiments/run_experiment_batch.py --pattern 'exp0[1-3]*' --dry-run
    python kellen/experiments/run_experiment_batch.py exp03_a exp03_b epochs=10000
    python kellen/experiments/run_experiment_batch.py --pattern exp03 --tmux      # detached, in tmux
    python kellen/experiments/run_experiment_batch.py --pattern exp03 --tpu my-v4-64 --zone us-central2-b

Positional words with '=' (or starting with + or ~) are Hydra overrides for every selected run;
each such variant is its own run (`exp03_a--epochs=10000`). Re-running the same command skips
the completed runs, resumes the preempted ones and retries nothing else (--retry-failed does).
Exit code: 0 all done/skipped, 1 a selected run failed (in this batch or an earlier one) or is
blocked, 75 interrupted or a run left preempted, 2 bad arguments.

Refused before anything runs (exit 2): names and patterns outside [A-Za-z0-9_.-] (and globs),
run_name/group overrides that are not plain names, '..' in output_root/checkpoint_path/
load_checkpoint, hydra.* overrides, and overrides carrying a credential (secrets go by environment).
A batch killed outright leaves its trainer to save and exit 75 (parent-death signal); started
again on the same machine it takes the dead batch's lease over at once and waits for that trainer
(KELLEN_ORPHAN_WAIT_S, default 900) before resuming. KELLEN_LEASE_EXPIRES_S (default 300): after
how long without a heartbeat another machine's lease counts as dead.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make `kellen` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kellen.experiments.runs import RunError, Selection, check_name  # noqa: E402
from kellen.cli import ArgumentParser  # noqa: E402

PROG = "run_experiment_batch.py"


class Parser(ArgumentParser):
    """kellen.cli's one-line usage errors, redacted: they quote the words given, which may hold a secret."""

    def error(self, message):
        from kellen.train.redact import redact

        super().error(redact(message))


def add_common(p: argparse.ArgumentParser) -> None:
    """Flags shared by `batch` and `run`."""
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (configs composed through Hydra); launch nothing")
    p.add_argument("--output-root", metavar="ROOT",
                   help="run records under ROOT (local or gs://); passed as output_root=")
    p.add_argument("--config-dir", metavar="DIR", help="look up configs in DIR first (as pretrain_jax.py --config-dir)")
    p.add_argument("--logs-dir", metavar="DIR", help="batch logs and batch_status.json under DIR/<batch id>/ "
                                                     "(default <output root>/_batches, or runs/_batches)")
    p.add_argument("--retries", type=int, default=0, metavar="N",
                   help="resume a run preempted during this batch up to N times (default 0: the next batch does)")
    p.add_argument("--rerun", action="store_true",
                   help="run completed runs again as <name>--rerunK (the old record stays)")
    p.add_argument("--retry-failed", action="store_true", help="run failed runs again (resuming their checkpoints)")
    p.add_argument("--stale-after", type=float, default=15 * 60, metavar="S",
                   help="a 'running' status without a heartbeat for S seconds is dead (default 900)")
    p.add_argument("--tmux", nargs="?", const="", default=None, metavar="SESSION",
                   help="re-run this command detached in tmux session SESSION (default: a name from the selection); "
                        "put it last or write --tmux=SESSION, or it takes the next word as the session")
    p.add_argument("--tpu", metavar="NAME", help="launch each run on every worker of TPU VM NAME (needs --zone)")
    p.add_argument("--zone", metavar="ZONE", help="the TPU VM's zone")
    p.add_argument("--project", metavar="PROJECT", help="the TPU VM's GCP project (default: gcloud's)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("words", nargs="*", metavar="NAME|KEY=VALUE", help="config names, and overrides for every run")
    p.add_argument("--pattern", action="append", default=[], metavar="GLOB",
                   help="select configs by glob (repeatable); a bare prefix like exp03 matches exp03 and exp03_*")
    p.add_argument("--regex", action="append", default=[], metavar="RE", help="select configs whose name matches RE")
    p.add_argument("--list", action="store_true", help="print the selected run names and exit")
    p.add_argument("--fail-fast", action="store_true", help="stop the batch at the first failed run")
    add_common(p)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """`kellen batch ...`"""
    p = subparsers.add_parser("batch", help="run a batch of experiment configs (skip done, resume preempted)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(fn=lambda args: run_args(args, sys.argv[2:], prog="kellen batch"))
    return p


def is_override(word: str) -> bool:
    return "=" in word or word.startswith(("+", "~"))


def strip_tmux(argv: list, session: str) -> list:
    """argv without --tmux [SESSION] / --tmux=SESSION, for the command tmux runs."""
    out, skip = [], False
    for i, tok in enumerate(argv):
        if skip:
            skip = False
            continue
        if tok == "--tmux":
            skip = bool(session) and i + 1 < len(argv) and argv[i + 1] == session
            continue
        if tok.startswith("--tmux="):
            continue
        out.append(tok)
    return out


def tmux_relaunch(args, argv: list, script: str, default_name: str) -> int:
    """Hand the same command, minus --tmux [SESSION], to kellen.experiments.launchers.relaunch_in_tmux
    as [python, this script, args...]; it starts a detached tmux session and returns 0 (2 if the
    session name is bad or taken). Without a SESSION the name comes from `default_name`."""
    from kellen.experiments.launchers import relaunch_in_tmux

    command = [sys.executable, os.path.abspath(script), *strip_tmux(list(argv), args.tmux)]
    return int(relaunch_in_tmux(command, args.tmux or None, default_name=default_name) or 0)


def make_launcher(args, echo: bool = False):
    """LocalLauncher, or the TPU-VM launcher from kellen.experiments.launchers when --tpu is given."""
    if args.tpu:
        check_name(args.tpu, "TPU name")
        if not args.zone:
            raise RunError("--tpu needs --zone")
        check_name(args.zone, "zone")
        if args.project:
            check_name(args.project, "project")
        from kellen.experiments.launchers import launcher_from_args

        return launcher_from_args(args)
    from kellen.experiments.runs import LocalLauncher

    return LocalLauncher(echo=echo)


def normalise_roots(args) -> None:
    # Runs start in the repo root: a relative local --output-root means relative to where we are.
    if args.output_root and not args.output_root.startswith("gs://"):
        args.output_root = os.path.abspath(args.output_root)


def check_overrides(names: list, overrides: list, config_dir, output_root) -> None:
    """Bad overrides are a bad command line: compose each selected config with them through Hydra
    and raise RunError naming the key before anything is planned or written. A config that does
    not compose without them either is left to the plan, which reports it as blocked."""
    from kellen.experiments import runs

    if not overrides:
        return
    for name in names:
        if runs.config_file(name, config_dir) is None:
            continue
        try:
            runs.compose(runs.resolve(name, overrides, config_dir=config_dir, output_root=output_root))
        except RunError as e:
            try:
                runs.compose(runs.resolve(name, [], config_dir=config_dir, output_root=output_root))
            except RunError:
                continue
            raise RunError(f"{name} with {' '.join(overrides)}: {e}") from None


def run_args(args, argv: list, prog: str = PROG) -> int:
    from kellen.experiments import batch, runs

    try:
        normalise_roots(args)
        names = [w for w in args.words if not is_override(w)]
        selection = Selection(patterns=args.pattern, regexes=args.regex, names=names,
                              overrides=[runs.check_override(w) for w in args.words if is_override(w)])
        if args.list:
            for name in runs.select(selection, args.config_dir):
                print(name)
            return 0
        if selection.empty:
            raise RunError("select runs with --pattern, --regex or names (--list shows them)")
        selected = runs.select(selection, args.config_dir)
        if not selected:
            where = os.path.abspath(args.config_dir) if args.config_dir else runs.REPO_CONFIGS
            what = " or ".join([f"--pattern {p!r}" for p in args.pattern] + [f"--regex {r!r}" for r in args.regex])
            raise RunError(f"{what} matches no config in {where}")
        check_overrides(selected, selection.overrides, args.config_dir, args.output_root)
        if args.tmux is not None and not args.dry_run:  # a dry run just prints, here (names checked above)
            return tmux_relaunch(args, argv, __file__, "-".join(args.pattern + names + args.regex)[:40])
        launcher = None if args.dry_run else make_launcher(args)
    except RunError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return batch.run_batch(selection, launcher, dry_run=args.dry_run, retries=args.retries, fail_fast=args.fail_fast,
                           rerun=args.rerun, retry_failed=args.retry_failed, output_root=args.output_root,
                           config_dir=args.config_dir, logs_dir=args.logs_dir, stale_after_s=args.stale_after,
                           argv=[sys.executable, os.path.abspath(__file__), *argv])


def script_main(prog: str, doc: str, add_args, run, argv=None) -> int:
    """The command line of a runner script (this one and run_experiment.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return run(p.parse_intermixed_args(argv), argv)  # overrides may follow the options too


def main(argv=None) -> int:
    return script_main(PROG, __doc__, add_arguments, run_args, argv)


if __name__ == "__main__":
    sys.exit(main())
