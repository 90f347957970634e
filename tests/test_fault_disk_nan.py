"""Fault-injection scenarios 4 and 5, through the real pretrain_jax.py and batch runner.

4. Disk full during a checkpoint save: the checkpoint dir is a real tmpfs sized so that two
   checkpoints fit and the third does not (a tiny-model checkpoint takes ~870 KiB there). The run
   must stop with exit 1, one line on stderr, status.json/FAILED.txt saying why; the committed
   checkpoints stay intact and a resume from a roomy copy continues from the newest of them.
5. A NaN loss injected inside the jitted step (`fault_nan_at_step`): the run fails at that step,
   saves nothing after it; in a batch the next run still runs and the batch reports both.

The small filesystem is a tmpfs mounted directly when this process may (root), else inside a
user+mount namespace around the trainer (`unshare --user --map-root-user --mount`); set
KELLEN_FAULT_SMALLFS=unshare to force the namespace. Without either the disk-full tests skip.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tree_helpers import read_tree
from pretrain_helpers import REPO, TEST_CONFIGS, clean_env, metrics
from test_batch_runner import BATCH, batch_states, script, write_config
from test_resume import run_args

CKPT_KIB = 870  # one tiny-model checkpoint on tmpfs (868 KiB measured; ~25 files, each >= one page)
SMALL_FS_KIB = 2 * CKPT_KIB + CKPT_KIB // 2  # two checkpoints fit (steps 4 and 8), the third (12) does not
EVERY = 4  # checkpoint_every_steps: saves at 4, 8 (also the eval), 12 (fails); 16 steps in all


# --------------------------------------------------------------------------- helpers
def pretrain_cmd(*overrides):
    return [sys.executable, str(REPO / "pretrain_jax.py"), "--config-dir", str(TEST_CONFIGS), *map(str, overrides)]


def committed_steps(directory):
    return sorted(int(p) for p in os.listdir(directory) if p.isdigit())


def file_hashes(directory):
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in read_tree(directory).items()}


def restore_state(directory, step):
    """A committed step's saved arrays, read with Orbax as numpy (no mesh needed)."""
    path = os.path.join(directory, str(step), "state")
    with ocp.PyTreeCheckpointer() as c:
        tree = c.metadata(path).item_metadata.tree
        args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return c.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def listed_steps(directory):
    """What Orbax itself lists as committed (what a resume may pick)."""
    mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                 item_names=("state", "meta"))
    try:
        return list(mngr.all_steps()), mngr.latest_step()
    finally:
        mngr.close()


def train_segments(run_dir):
    """Train losses per start of the trainer in this run dir: [{step: (lm_loss, q_halt_loss)}, ...]."""
    segments = []
    for r in metrics(run_dir):
        if "num_params" in r:
            segments.append({})
        elif "train/lm_loss" in r:
            segments[-1][r["step"]] = (r["train/lm_loss"], r["train/q_halt_loss"])
    return segments


def stderr_lines(text):
    return [ln for ln in text.splitlines() if ln.strip()]


class SmallFs:
    """A real tmpfs of `kib` KiB at `path`. `command(cmd)` wraps a command to run with it mounted;
    `live(pid)` is where the running command's view of it can be read; `after` holds it once the
    command has ended (the mount itself, or a copy made inside the namespace as it exits)."""

    def __init__(self, path, kib, snapshot):
        self.path, self.kib, self.mode = str(path), kib, None
        self.after = str(path)
        self._snapshot = str(snapshot)
        os.makedirs(self.path, exist_ok=True)

    def mount(self):
        tmpfs = ["mount", "-t", "tmpfs", "-o", f"size={self.kib}k", "tmpfs", self.path]
        why = []
        if os.environ.get("KELLEN_FAULT_SMALLFS") != "unshare":
            r = subprocess.run(tmpfs, capture_output=True, text=True)
            if r.returncode == 0:
                self.mode = "mount"
                return
            why.append(f"mount: {r.stderr.strip() or r.returncode}")
        if not shutil.which("unshare"):
            pytest.skip(f"no small filesystem can be mounted here ({'; '.join(why)}; unshare: not installed)")
        r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", *tmpfs], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"no small filesystem can be mounted here ({'; '.join(why)}; unshare: {r.stderr.strip()})")
        self.mode, self.after = "unshare", self._snapshot
        os.makedirs(self._snapshot, exist_ok=True)

    def command(self, cmd):
        if self.mode == "mount":
            return cmd
        inside = ('kib=$1 dir=$2 snap=$3; shift 3; mount -t tmpfs -o size="$kib"k tmpfs "$dir" || exit 97; '
                  '"$@"; rc=$?; cp -a "$dir"/. "$snap"/; exit $rc')
        return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", inside, "sh",
                str(self.kib), self.path, self._snapshot, *cmd]

    def live(self, pid):
        return self.path if self.mode == "mount" else f"/proc/{pid}/root{self.path}"

    def unmount(self):
        if self.mode == "mount":
            subprocess.run(["umount", self.path], check=False, capture_output=True)
            if os.path.ismount(self.path):
                subprocess.run(["umount", "-l", self.path], check=False, capture_output=True)


# --------------------------------------------------------------------------- scenario 4: disk full
class DiskFullRun:
    """One run whose checkpoint dir is a tmpfs that fills at the step-12 save (the run record on a
    roomy disk), watched while it runs: each committed step's files are hashed as it appears. It
    runs when a test first asks for it (so its time counts in that test's row of the suite table)."""

    def __init__(self, base, fs, data, cache):
        self.base, self.fs, self.data, self.cache, self._result = base, fs, data, cache, None

    def __call__(self):
        if self._result is None:
            try:
                self._result = self._run()
            except Exception as e:  # once: the other tests report the same error, without re-running
                self._result = e
        if isinstance(self._result, Exception):
            raise self._result
        return self._result

    def _run(self):
        fs, base = self.fs, self.base
        ckpt = os.path.join(fs.path, "ck")
        args = run_args(self.data, base, self.cache, "full", f"checkpoint_every_steps={EVERY}",
                        f"checkpoint_path={ckpt}")
        proc = subprocess.Popen(fs.command(pretrain_cmd(*args)), cwd=REPO, env=clean_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        seen = {}  # committed step -> (file hashes, taken while the trainer was still running)
        try:
            live = os.path.join(fs.live(proc.pid), "ck")
            deadline = time.time() + 400
            while proc.poll() is None and time.time() < deadline:
                try:
                    for step in committed_steps(live):
                        if step not in seen:
                            hashes = file_hashes(os.path.join(live, str(step)))
                            seen[step] = (hashes, proc.poll() is None)
                except FileNotFoundError:
                    pass  # not created yet, or the namespace is going away
                time.sleep(0.05)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:  # hung: stop it and what it started (its own process group)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
        after = os.path.join(fs.after, "ck")
        roomy = base / "roomy-ck"
        shutil.copytree(after, roomy, symlinks=True)  # everything, the half-written step 12 included
        return dict(proc=proc, out=out, err=err, ckpt=ckpt, after=after, roomy=str(roomy), seen=seen,
                    run_dir=base / "adhoc" / "full", args=args)


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory, tiny_sudoku, compile_cache):
    """The disk-full run (see DiskFullRun), its small filesystem unmounted after the module."""
    base = tmp_path_factory.mktemp("diskfull")
    fs = SmallFs(base / "small", SMALL_FS_KIB, base / "small-after")
    fs.mount()
    try:
        yield DiskFullRun(base, fs, tiny_sudoku, compile_cache)
    finally:
        fs.unmount()


@pytest.mark.fault(4, "disk full at a checkpoint save: exit 1, one stderr line (path, ENOSPC), status/FAILED.txt")
def test_disk_full_fails_the_run_cleanly(disk_full):
    d = disk_full()
    assert d["proc"].returncode == 1, d["err"][-3000:]
    lines = stderr_lines(d["err"])
    expected = f"checkpoint save of step 12 to {d['ckpt']} failed: No space left on device (ENOSPC)"
    assert lines == [f"pretrain_jax.py: error: {expected} (see FAILED.txt in the run dir)"], d["err"][-3000:]

    status = json.loads((d["run_dir"] / "status.json").read_text())
    assert status["state"] == "failed"
    assert status["reason"] == f"CheckpointSaveError: {expected}"
    assert 12 < status["step"] < 16, status  # stopped soon after the failed save, not at the end
    failed = (d["run_dir"] / "FAILED.txt").read_text()
    assert failed.startswith(f"run failed at step {status['step']}: CheckpointSaveError: {expected}\n")
    train_steps = [r["step"] for r in metrics(d["run_dir"]) if "train/lm_loss" in r]
    # It trained no further (the row of the step it stopped in may not have been fetched yet).
    assert train_steps == list(range(1, max(train_steps) + 1)) and 12 <= max(train_steps) <= status["step"]
    # Orbax's own error logs (tracebacks from its save threads) went to the log file, not the console.
    assert "No space left on device" in (d["run_dir"] / "logs" / "train.log").read_text()


@pytest.mark.fault(4, "disk full: committed checkpoints intact, restorable, unchanged; the partial step unlisted")
def test_disk_full_keeps_the_committed_checkpoints(disk_full):
    d = disk_full()
    after = d["after"]
    assert committed_steps(after) == [4, 8], (os.listdir(after), "resize SMALL_FS_KIB if checkpoints changed size")
    partial = [p for p in os.listdir(after) if not p.isdigit()]
    assert partial and all(p.startswith("12.orbax-checkpoint-tmp") for p in partial), partial  # left uncommitted
    assert listed_steps(after) == ([4, 8], 8)
    for step in (4, 8):
        hashes, while_running = d["seen"][step]
        assert while_running, f"step {step} was first seen after the trainer exited"
        assert file_hashes(os.path.join(after, str(step))) == hashes, f"step {step} changed after its commit"
        assert len(hashes) > 5
    tree = restore_state(after, 8)
    assert int(np.asarray(tree["train"]["step"])) == 8
    leaves = jax.tree_util.tree_leaves(tree["train"])
    assert len(leaves) > 10 and all(np.isfinite(np.asarray(x, np.float64)).all() for x in leaves)


@pytest.mark.fault(4, "disk full: resume from a roomy copy continues from the last committed step, bit-identical")
def test_disk_full_resume_from_a_roomy_copy(disk_full, tiny_sudoku, compile_cache):
    d = disk_full()
    args = [a for a in d["args"] if not a.startswith("checkpoint_path=")] + [f"checkpoint_path={d['roomy']}"]
    again = subprocess.run(pretrain_cmd(*args), cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from step 8" in again.stdout
    status = json.loads((d["run_dir"] / "status.json").read_text())
    assert (status["state"], status["step"]) == ("completed", 16)
    assert 16 in committed_steps(d["roomy"]) and all(p.isdigit() for p in os.listdir(d["roomy"]))  # partial cleaned
    first, second = train_segments(d["run_dir"])
    assert sorted(second) == list(range(9, 17))
    # Steps 9.. after the resume repeat the failed run's exactly: step 8 was restored as it was saved.
    assert max(first) >= 12 and all(second[s] == first[s] for s in range(9, max(first) + 1)), (first, second)


# --------------------------------------------------------------------------- scenario 5: NaN
@pytest.mark.fault(5, "NaN injected at step 5 (fault_nan_at_step): failed at 5, FAILED.txt, no checkpoint after")
def test_injected_nan_fails_the_run_at_that_step(tmp_path, tiny_sudoku, compile_cache):
    args = run_args(tiny_sudoku, tmp_path, compile_cache, "nan5", "fault_nan_at_step=5", "log_every=1",
                    "checkpoint_every_steps=1", "checkpoint_keep=10")
    proc = subprocess.run(pretrain_cmd(*args), cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = stderr_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("pretrain_jax.py: error: non-finite training loss at step 5: "
                                                   "lm_loss=nan"), proc.stderr[-3000:]
    run = tmp_path / "adhoc" / "nan5"
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["step"]) == ("failed", 5)
    assert status["reason"].startswith("NonFiniteLoss: non-finite training loss at step 5: lm_loss=nan")
    failed = (run / "FAILED.txt").read_text()
    assert failed.startswith("run failed at step 5: NonFiniteLoss: non-finite training loss at step 5")
    assert '"step": 5' in failed and '"train/lm_loss": NaN' in failed  # the last metrics, the NaN row
    rows = [r for r in metrics(run) if "train/lm_loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r["train/lm_loss"]) for r in rows[:4]) and np.isnan(rows[4]["train/lm_loss"])
    # Saved every step, but never the NaN state: its loss is checked before it is saved.
    ckpts = run / "checkpoints"
    assert committed_steps(ckpts) == [1, 2, 3, 4] and all(p.isdigit() for p in os.listdir(ckpts))
    leaves = jax.tree_util.tree_leaves(restore_state(str(ckpts), 4)["train"])
    assert all(np.isfinite(np.asarray(x, np.float64)).all() for x in leaves)


@pytest.mark.fault(5, "NaN run in a batch: it fails, the next run completes, table/batch_status show both, exit 1")
def test_injected_nan_in_a_batch_fails_one_run_and_the_batch_goes_on(tmp_path, tiny_sudoku, compile_cache):
    cfg, out, logs = tmp_path / "configs", tmp_path / "runs", tmp_path / "logs"
    # The tiny experiment's sizes and LR schedule (16 steps), so both come from the compile cache;
    # max_steps=8 (an eval at 8 ends it) keeps the schedule and halves the second run.
    write_config(cfg, "f5_a_nan", tiny_sudoku, compile_cache, extra="fault_nan_at_step: 5\n")
    write_config(cfg, "f5_b_ok", tiny_sudoku, compile_cache, extra="max_steps: 8\n")
    proc = script(BATCH, "--pattern", "f5", config_dir=cfg, out=out, logs=logs)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # 1: a run failed

    (state,) = batch_states(logs)
    assert (state["state"], state["exit_code"]) == ("failed", 1)
    r = state["runs"]
    assert list(r) == ["f5_a_nan", "f5_b_ok"]  # in name order: the NaN run first
    assert (r["f5_a_nan"]["state"], r["f5_a_nan"]["exit_codes"], r["f5_a_nan"]["step"]) == ("failed", [1], 5)
    assert (r["f5_b_ok"]["state"], r["f5_b_ok"]["exit_codes"], r["f5_b_ok"]["step"]) == ("completed", [0], 8)
    assert "non-finite training loss at step 5" in open(r["f5_a_nan"]["stderr"]).read()

    table = proc.stdout.split("EXACT_ACC")[-1].splitlines()
    row = {ln.split()[0]: ln.split() for ln in table if ln.strip() and not ln.startswith("batch ")}
    assert "failed" in row["f5_a_nan"] and "5/16" in row["f5_a_nan"]
    assert "completed" in row["f5_b_ok"] and "8/8" in row["f5_b_ok"]

    nan_run, ok_run = out / "tb" / "f5_a_nan", out / "tb" / "f5_b_ok"
    assert json.loads((nan_run / "status.json").read_text())["state"] == "failed"
    assert (nan_run / "FAILED.txt").read_text().startswith("run failed at step 5: NonFiniteLoss")
    assert json.loads((ok_run / "status.json").read_text())["state"] == "completed"
    # The hook is inert until its step: both runs trained identically through step 4.
    (a,), (b,) = train_segments(nan_run), train_segments(ok_run)
    assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)] and np.isnan(a[5][0]) and np.isfinite(b[5][0])
