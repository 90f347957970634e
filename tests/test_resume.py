"""Checkpoints and preemption (fault-injection scenarios 1-3): SIGTERM then resume is bit-identical to an
uninterrupted run, for 1 and 2 processes, on local disk and gs://; kill -9 during saves resumes from the
last committed step; a 10 s GCS outage is survived; a changed model config is refused by name."""
import os
import random
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pretrain_helpers import clean_env, metrics, pretrain


def run_args(data, out, cache, name, *extra):
    return ["+experiment=tiny", f"data_paths=[{data}]", f"output_root={out}", f"run_name={name}",
            f"compilation_cache_dir={cache}", *extra]


def train_losses(run_dir):
    """Per step, the last logged loss (steps re-run after a resume overwrite the earlier ones)."""
    out = {}
    for r in metrics(run_dir):
        if "train/lm_loss" in r:
            out[r["step"]] = (r["train/lm_loss"], r["train/q_halt_loss"])
    return out


def final_params(run_dir):
    ckpts = run_dir / "checkpoints"
    last = max(int(p) for p in os.listdir(ckpts) if p.isdigit())
    path = str(ckpts / str(last) / "state")
    with ocp.PyTreeCheckpointer() as c:  # as numpy: the saving topology may not exist here
        tree = c.metadata(path).item_metadata.tree
        args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return last, c.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def wait_for_steps(run_dir, n, proc, timeout=300):
    path = run_dir / "logs" / "metrics.jsonl"
    t = time.time()
    while time.time() - t < timeout and proc.poll() is None:
        if path.exists() and sum('"train/lm_loss"' in line for line in path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    detail = proc.communicate(timeout=60)[1][-3000:] if proc.poll() is not None else "still running"
    raise AssertionError(f"run did not reach step {n}: {detail}")


def assert_same_tree(a, b):
    la, lb = jax_leaves(a), jax_leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        assert np.array_equal(la[k], lb[k]), k


def jax_leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def gcs_train_losses(run_url):
    from kellen import gcs
    import json as _json

    out = {}
    for line in gcs.read_text(run_url + "/logs/metrics.jsonl").splitlines():
        r = _json.loads(line)
        if "train/lm_loss" in r:
            out[r["step"]] = (r["train/lm_loss"], r["train/q_halt_loss"])
    return out


def gcs_final_params(run_url):
    from kellen import gcs

    ckpts = run_url + "/checkpoints"
    last = max(int(d) for d in gcs.list_dirs(ckpts) if d.isdigit())
    path = f"{ckpts}/{last}/state"
    with ocp.PyTreeCheckpointer() as c:
        tree = c.metadata(path).item_metadata.tree
        args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return last, c.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


# Checkpoint cadence does not change what is computed, so every cut run below is compared with one
# uninterrupted run per process count (saves every 2 steps give SIGTERM a mid-run save to land on).
CUT = ("checkpoint_every_steps=2", "epochs=8")  # 32 steps


@pytest.fixture(scope="module")
def straight1(tmp_path_factory, tiny_sudoku, compile_cache):
    out = tmp_path_factory.mktemp("straight1")
    r = pretrain(*run_args(tiny_sudoku, out, compile_cache, "straight", *CUT))
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "adhoc" / "straight"


@pytest.mark.fault(1, "SIGTERM at a random step, resume: losses and params bit-identical (1 process, local)")
def test_sigterm_then_resume_is_bit_identical(tmp_path, tiny_sudoku, compile_cache, straight1):
    run_dir = tmp_path / "adhoc" / "cut"
    proc = pretrain(*run_args(tiny_sudoku, tmp_path, compile_cache, "cut", *CUT), popen=True)
    try:
        wait_for_steps(run_dir, random.Random(os.getpid()).randint(2, 24), proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-3000:]
    import json
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and 2 <= status["step"] < 32
    assert "preempted at step" in err
    again = pretrain(*run_args(tiny_sudoku, tmp_path, compile_cache, "cut", *CUT))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from step {status['step']}" in again.stdout
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    a, b = train_losses(straight1), train_losses(run_dir)
    assert sorted(a) == sorted(b) == list(range(1, 33))
    assert a == b  # bit-identical floats, every step
    (sa, pa), (sb, pb) = final_params(straight1), final_params(run_dir)
    assert sa == sb == 32
    assert_same_tree(pa, pb)


@pytest.mark.fault(2, "kill -9 during async saves: resume from the newest committed step, never a partial one")
def test_kill_9_during_saves_resumes_from_the_last_committed_step(tmp_path, tiny_sudoku, compile_cache, straight1):
    run_dir = tmp_path / "adhoc" / "k9"
    args = run_args(tiny_sudoku, tmp_path, compile_cache, "k9", *CUT, "checkpoint_every_steps=1")
    proc = pretrain(*args, popen=True)
    try:
        wait_for_steps(run_dir, random.Random(os.getpid()).randint(4, 20), proc)
        proc.send_signal(signal.SIGKILL)  # in the middle of a save, as likely as not
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    entries = os.listdir(run_dir / "checkpoints")
    committed = sorted(int(p) for p in entries if p.isdigit())  # finalised by rename; tmp dirs are not digits
    assert committed
    for step in committed:  # every listed step is whole: its commit marker and its state
        assert (run_dir / "checkpoints" / str(step) / "state" / "_METADATA").exists(), step
    again = pretrain(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = int(again.stdout.split("resuming from step ")[1].split()[0])
    assert resumed == committed[-1]
    assert train_losses(run_dir) == train_losses(straight1)
    assert not [p for p in os.listdir(run_dir / "checkpoints") if not p.isdigit()]  # partial dirs cleaned up


def test_resume_refuses_a_changed_model_and_allows_more_epochs(tmp_path, tiny_sudoku, compile_cache):
    args = run_args(tiny_sudoku, tmp_path, compile_cache, "guard", "max_steps=2")
    assert pretrain(*args).returncode == 0
    r = pretrain(*args, "arch.hidden_size=64", "lr=0.5")
    assert r.returncode == 2
    assert r.stderr.strip() == (f"pretrain_jax.py: error: {tmp_path}/adhoc/guard/config.yaml: resuming with a "
                                "different arch.hidden_size, arch.puzzle_emb_ndim, lr (these change the model, optimizer or data; "
                                "start a new run_name instead)")
    r = pretrain(*run_args(tiny_sudoku, tmp_path, compile_cache, "guard", "max_steps=4"))
    assert r.returncode == 0 and "resuming from step 2 (changed: max_steps)" in r.stdout
    rows = metrics(tmp_path / "adhoc" / "guard")
    assert {"resume": {"step": 2, "changed": ["max_steps"]}} in [{k: v for k, v in r.items() if k == "resume"}
                                                                 for r in rows]


@pytest.mark.fault(1, "SIGTERM mid-run, resume: bit-identical, whole record on gs:// (1 process, gs://)")
def test_preempt_and_resume_on_gcs(tmp_path, tiny_sudoku, compile_cache, gcs_prefix, straight1):
    from kellen import gcs
    root = gcs_prefix + "runs"
    run = root + "/adhoc/g"
    args = run_args(tiny_sudoku, root, compile_cache, "g", *CUT)
    proc = pretrain(*args, popen=True)
    cut_after = random.Random(os.getpid()).choice([2, 4, 6])
    try:
        t = time.time()
        while time.time() - t < 300 and proc.poll() is None:
            steps = [int(d) for d in gcs.list_dirs(run + "/checkpoints") if d.isdigit()] \
                if gcs.exists(run + "/checkpoints/") else []
            if steps and max(steps) >= cut_after:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    import json
    assert proc.returncode == 75, err[-3000:]
    status = json.loads(gcs.read_text(run + "/status.json"))
    assert status["state"] == "preempted" and status["step"] < 32
    again = pretrain(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from step {status['step']}" in again.stdout
    assert json.loads(gcs.read_text(run + "/status.json"))["state"] == "completed"
    record = set(gcs.list_files(run))  # the whole local record lands on gs:// too
    for name in ("summary.json", "metrics.csv", "reproduce.sh", "logs/train.log", "plots/loss_vs_step.png"):
        assert name in record, name
    assert json.loads(gcs.read_text(run + "/summary.json"))["final_eval"]["step"] == 32
    assert gcs_train_losses(run) == train_losses(straight1)
    (sa, pa), (sb, pb) = final_params(straight1), gcs_final_params(run)
    assert sa == sb == 32
    assert_same_tree(pa, pb)


def two_processes(tiny_sudoku, root, compile_cache, name):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [pretrain(*run_args(tiny_sudoku, root, compile_cache, name, *CUT),
                     f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
                     f"distributed.process_id={i}", "distributed.cpu_devices_per_process=2", popen=True)
            for i in range(2)]


def finish(procs):
    try:
        return [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.fixture(scope="module")
def straight2(tmp_path_factory, tiny_sudoku, compile_cache):
    out = tmp_path_factory.mktemp("straight2")
    procs = two_processes(tiny_sudoku, out, compile_cache, "straight2")
    for p, (_, err) in zip(procs, finish(procs)):
        assert p.returncode == 0, err[-3000:]
    return out / "adhoc" / "straight2"


@pytest.mark.parametrize("storage", ["local", "gcs"])
@pytest.mark.fault(1, "SIGTERM to both processes, resume: bit-identical (2 processes, local and gs://)")
def test_two_process_sigterm_then_resume_is_bit_identical(tmp_path, tiny_sudoku, compile_cache, straight2,
                                                          storage, request):
    if storage == "gcs":
        root = request.getfixturevalue("gcs_prefix") + "runs"
        from kellen import gcs

        def progressed():
            d = root + "/adhoc/cut2/checkpoints"
            return gcs.exists(d + "/") and any(x.isdigit() and int(x) >= 2 for x in gcs.list_dirs(d))
    else:
        root = tmp_path
        progressed = None
    cut = two_processes(tiny_sudoku, root, compile_cache, "cut2")
    if progressed is None:
        wait_for_steps(tmp_path / "adhoc" / "cut2", random.Random(os.getpid()).randint(2, 24), cut[0])
    else:
        t = time.time()
        while time.time() - t < 300 and cut[0].poll() is None and not progressed():
            time.sleep(0.1)
    for p in cut:
        p.send_signal(signal.SIGTERM)  # JAX's preemption notifier; all agree on one step
    outs = finish(cut)
    codes = [p.returncode for p in cut]
    assert codes == [75, 75], [e[-2000:] for _, e in outs]
    again = two_processes(tiny_sudoku, root, compile_cache, "cut2")
    outs = finish(again)
    for p, (out, err) in zip(again, outs):
        assert p.returncode == 0, err[-3000:]
    assert "resuming from step" in outs[0][0]
    if storage == "gcs":
        losses, (sb, pb) = gcs_train_losses(root + "/adhoc/cut2"), gcs_final_params(root + "/adhoc/cut2")
    else:
        losses, (sb, pb) = train_losses(tmp_path / "adhoc" / "cut2"), final_params(tmp_path / "adhoc" / "cut2")
    assert train_losses(straight2) == losses
    sa, pa = final_params(straight2)
    assert sa == sb == 32
    assert_same_tree(pa, pb)


@pytest.mark.fault(3, "GCS emulator frozen ~10 s mid-run: saves retry, run completes, later checkpoints whole")
def test_training_survives_a_10_second_gcs_outage(tmp_path, tiny_sudoku, compile_cache, monkeypatch):
    """The emulator is frozen (SIGSTOP) for ~10 s mid-run: saves wait and retry, the run finishes,
    and the checkpoints after the outage are committed."""
    from gcs_emulator import start_emulator
    from kellen import gcs
    emu = start_emulator(tmp_path / "emu")
    try:
        emu.create_bucket("outage")
        env = clean_env(emu.env)
        root = "gs://outage/runs"
        args = run_args(tiny_sudoku, root, compile_cache, "o", "epochs=20", "eval_interval=10",
                        "checkpoint_every_steps=10")
        proc = pretrain(*args, env=env, popen=True)
        try:
            for k, v in emu.env.items():  # this test's own emulator, for the checks below
                monkeypatch.setenv(k, v)
            t = time.time()
            while time.time() - t < 300 and proc.poll() is None:
                if gcs.exists(root + "/adhoc/o/checkpoints/10/"):
                    break
                time.sleep(0.2)
            os.killpg(emu.process.pid, signal.SIGSTOP)
            time.sleep(10)
            os.killpg(emu.process.pid, signal.SIGCONT)
            out, err = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err[-3000:]
        steps = {int(p.split("/")[0]) for p in gcs.list_files(root + "/adhoc/o/checkpoints") if p.split("/")[0].isdigit()}
        assert 80 in steps and max(steps) == 80
        last, params = gcs_final_params(root + "/adhoc/o")  # the checkpoint after the outage restores whole
        assert last == 80 and jax_leaves(params)
    finally:
        os.killpg(emu.process.pid, signal.SIGCONT)
        emu.stop()
