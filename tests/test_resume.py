"""Checkpoints and preemption: SIGTERM then resume is bit-identical to an uninterrupted run; kill -9
during saves resumes from the last committed step; a changed model config is refused by name."""
import os
import random
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

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


def test_sigterm_then_resume_is_bit_identical(tmp_path, tiny_sudoku, compile_cache):
    straight = pretrain(*run_args(tiny_sudoku, tmp_path, compile_cache, "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    run_dir = tmp_path / "adhoc" / "cut"
    proc = pretrain(*run_args(tiny_sudoku, tmp_path, compile_cache, "cut"), popen=True)
    try:
        wait_for_steps(run_dir, random.Random(os.getpid()).randint(2, 9), proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-3000:]
    import json
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and 2 <= status["step"] < 16
    assert "preempted at step" in err
    again = pretrain(*run_args(tiny_sudoku, tmp_path, compile_cache, "cut"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from step {status['step']}" in again.stdout
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    a, b = train_losses(tmp_path / "adhoc" / "straight"), train_losses(run_dir)
    assert sorted(a) == sorted(b) == list(range(1, 17))
    assert a == b  # bit-identical floats, every step
    (sa, pa), (sb, pb) = final_params(tmp_path / "adhoc" / "straight"), final_params(run_dir)
    assert sa == sb == 16
    assert_same_tree(pa, pb)


def test_kill_9_during_saves_resumes_from_the_last_committed_step(tmp_path, tiny_sudoku, compile_cache):
    run_dir = tmp_path / "adhoc" / "k9"
    args = run_args(tiny_sudoku, tmp_path, compile_cache, "k9", "checkpoint_every_steps=1")
    proc = pretrain(*args, popen=True)
    try:
        wait_for_steps(run_dir, 6, proc)
        proc.send_signal(signal.SIGKILL)  # in the middle of a save, as likely as not
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    committed = [int(p) for p in os.listdir(run_dir / "checkpoints") if p.isdigit()]
    assert committed
    again = pretrain(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = int(again.stdout.split("resuming from step ")[1].split()[0])
    assert resumed in committed
    straight = pretrain(*run_args(tiny_sudoku, tmp_path, compile_cache, "ref"))
    assert straight.returncode == 0
    assert train_losses(run_dir) == train_losses(tmp_path / "adhoc" / "ref")


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


def test_preempt_and_resume_on_gcs(tmp_path, tiny_sudoku, compile_cache, gcs_prefix):
    from kellen import gcs
    root = gcs_prefix + "runs"
    args = run_args(tiny_sudoku, root, compile_cache, "g")
    proc = pretrain(*args, popen=True)
    try:
        t = time.time()
        while time.time() - t < 300 and proc.poll() is None:
            if gcs.list_files(root + "/adhoc/g/checkpoints") if gcs.exists(root + "/adhoc/g/checkpoints/") else []:
                break
            time.sleep(0.2)
        time.sleep(random.Random(os.getpid()).uniform(0.0, 1.0))
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    import json
    if proc.returncode == 75:
        status = json.loads(gcs.read_text(root + "/adhoc/g/status.json"))
        assert status["state"] == "preempted"
    else:
        assert proc.returncode == 0, err[-3000:]  # finished before the signal landed
    again = pretrain(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(gcs.read_text(root + "/adhoc/g/status.json"))["state"] == "completed"
    record = set(gcs.list_files(root + "/adhoc/g"))  # the whole local record lands on gs:// too
    for name in ("summary.json", "metrics.csv", "reproduce.sh", "logs/train.log", "plots/loss_vs_step.png"):
        assert name in record, name
    assert json.loads(gcs.read_text(root + "/adhoc/g/summary.json"))["final_eval"]["step"] == 16
    steps = {int(p.split("/")[0]) for p in gcs.list_files(root + "/adhoc/g/checkpoints") if p.split("/")[0].isdigit()}
    assert 16 in steps


def test_two_process_sigterm_then_resume_is_bit_identical(tmp_path, tiny_sudoku, compile_cache):
    import socket

    def two(name):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return [pretrain(*run_args(tiny_sudoku, tmp_path, compile_cache, name),
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

    straight = two("straight2")
    for p, (_, err) in zip(straight, finish(straight)):
        assert p.returncode == 0, err[-3000:]
    cut = two("cut2")
    wait_for_steps(tmp_path / "adhoc" / "cut2", random.Random(os.getpid()).randint(2, 9), cut[0])
    for p in cut:
        p.send_signal(signal.SIGTERM)  # JAX's preemption notifier; all agree on one step
    outs = finish(cut)
    codes = [p.returncode for p in cut]
    assert codes == [75, 75], [e[-2000:] for _, e in outs]
    again = two("cut2")
    for p, (out, err) in zip(again, finish(again)):
        assert p.returncode == 0, err[-3000:]
    assert train_losses(tmp_path / "adhoc" / "straight2") == train_losses(tmp_path / "adhoc" / "cut2")
    (sa, pa), (sb, pb) = final_params(tmp_path / "adhoc" / "straight2"), final_params(tmp_path / "adhoc" / "cut2")
    assert sa == sb == 16
    assert_same_tree(pa, pb)


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
    finally:
        os.killpg(emu.process.pid, signal.SIGCONT)
        emu.stop()
