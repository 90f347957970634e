"""Fault scenario 8: a worker of a 2-process CPU run is killed (kill -9).

The survivor must not hang: within about `distributed.heartbeat_timeout_seconds` it exits, process
0 (when it survives) writing status.json `failed` ("peer process 1 lost") and FAILED.txt; when
process 0 is the one killed, nothing can write the record, so status.json stays `running` and
`kellen status` reports it `stale` from its heartbeat. Either way, starting both processes again
resumes from the last committed checkpoint and completes.
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import threading
import time

import pytest

from kellen.experiments.status import run_status
from pretrain_helpers import clean_env, metrics, pretrain

HEARTBEAT_TIMEOUT = 10  # distributed.heartbeat_timeout_seconds in these runs
SURVIVOR_BOUND = 120  # generous: the survivor must be gone well within this after the kill
NAME = "worker_lost"
TOTAL_STEPS = 40  # tiny: 64 puzzles, batch 16 -> 4 steps per epoch, 10 epochs


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two(data, out, cache):
    port = free_port()
    common = ["+experiment=tiny", f"data_paths=[{data}]", f"output_root={out}", f"run_name={NAME}",
              f"compilation_cache_dir={cache}", "epochs=10", "eval_interval=10", "checkpoint_every_steps=3",
              "heartbeat_seconds=1", f"distributed.heartbeat_timeout_seconds={HEARTBEAT_TIMEOUT}",
              f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
              "distributed.cpu_devices_per_process=2"]
    return [pretrain(*common, f"distributed.process_id={i}", popen=True) for i in range(2)]


def kill_all(procs):
    """SIGKILL what still runs (after jax.distributed.initialize SIGTERM is caught); their stderr tails."""
    tails = []
    for p in procs:
        if p.poll() is None:
            p.kill()
        tails.append(p.communicate(timeout=60)[1][-2000:])
    return tails


def train_steps(run_dir, after=0):
    """The steps of the train rows in logs/metrics.jsonl, from row `after` on."""
    path = pathlib.Path(run_dir) / "logs" / "metrics.jsonl"
    lines = path.read_text().splitlines()[after:] if path.exists() else []
    return [json.loads(line)["step"] for line in lines if '"train/lm_loss"' in line]


def wait_for_steps(run_dir, n, procs, after=0, timeout=300):
    t = time.time()
    while time.time() - t < timeout and all(p.poll() is None for p in procs):
        if len(train_steps(run_dir, after)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach {n} more steps: {kill_all(procs)}")


def committed_steps(run_dir):
    ckpts = pathlib.Path(run_dir) / "checkpoints"
    return sorted(int(p) for p in os.listdir(ckpts) if p.isdigit()) if ckpts.exists() else []


def kill_one_and_time_survivor(procs, victim):
    """SIGKILL procs[victim]; (survivor's returncode, stdout, stderr, seconds it took to exit)."""
    survivor = procs[1 - victim]
    procs[victim].send_signal(signal.SIGKILL)
    t = time.monotonic()
    try:
        out, err = survivor.communicate(timeout=SURVIVOR_BOUND)
    except subprocess.TimeoutExpired:
        kill_all(procs)
        raise AssertionError(f"process {1 - victim} still running {SURVIVOR_BOUND} s after process {victim} "
                             "was killed: it hangs")
    seconds = time.monotonic() - t
    procs[victim].communicate()
    return survivor.returncode, out, err, seconds


def read_status(run_dir):
    return json.loads((run_dir / "status.json").read_text())


@pytest.mark.fault(8, "kill -9 of process 1, then 0: survivor exits in bounded time, status failed "
                      "'peer process 1 lost' / stale; reruns resume from the last checkpoint")
def test_killed_worker_then_killed_coordinator_each_resume(tmp_path, tiny_sudoku, compile_cache, kellen_cmd):
    run_dir = tmp_path / "adhoc" / NAME

    # 1. Process 1 is killed: process 0 records the lost peer and exits 1.
    procs = start_two(tiny_sudoku, tmp_path, compile_cache)
    wait_for_steps(run_dir, 6, procs)
    code, out, err, seconds = kill_one_and_time_survivor(procs, victim=1)
    # Exit code 1 from the peer watch, not -6 (SIGABRT from JAX's coordination service) nor a hang.
    assert code == 1, f"exit {code} after {seconds:.0f} s: {err[-3000:]}"
    assert "peer process 1 lost" in err, err[-3000:]
    status = read_status(run_dir)
    assert status["state"] == "failed" and status["reason"].startswith("peer process 1 lost"), status
    failed = (run_dir / "FAILED.txt").read_text()
    assert failed.startswith(f"run failed at step {status['step']}: peer process 1 lost"), failed[:500]
    first = committed_steps(run_dir)
    assert first and first[-1] < TOTAL_STEPS, first

    # 2. Both again: they resume; then process 0 (the coordinator) is killed. Process 1 exits;
    # nobody is left to write the record, so status.json stays `running` and goes stale.
    logged = len(metrics(run_dir))
    procs = start_two(tiny_sudoku, tmp_path, compile_cache)
    wait_for_steps(run_dir, 3, procs, after=logged)
    code, _, err, seconds = kill_one_and_time_survivor(procs, victim=0)
    assert code != 0, f"process 1 exited 0 after its coordinator was killed: {err[-3000:]}"
    out0 = procs[0].communicate()[0]
    assert f"resuming from step {first[-1]}" in out0, out0[-2000:]
    assert train_steps(run_dir, logged)[0] == first[-1] + 1  # continued, not restarted
    status = read_status(run_dir)
    assert status["state"] == "running" and status["pid"] == procs[0].pid, status

    def kellen_status(stale_after):
        r = subprocess.run([*kellen_cmd, "status", NAME, "--output-root", str(tmp_path), "--json",
                            "--stale-after", str(stale_after)], cwd=tmp_path, env=clean_env(),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return {row["run"]: row["state"] for row in json.loads(r.stdout)}

    time.sleep(max(0.0, status["heartbeat_unix"] + 3.5 - time.time()))
    assert kellen_status(3) == {NAME: "stale"}
    assert run_status(run_dir, stale_after=3600)["state"] == "running"  # the heartbeat's age decides
    second = committed_steps(run_dir)
    assert second[-1] >= first[-1] and second[-1] < TOTAL_STEPS, second

    # 3. Both again: they resume from the last committed checkpoint and complete.
    logged = len(metrics(run_dir))
    procs = start_two(tiny_sudoku, tmp_path, compile_cache)
    try:
        outs = [p.communicate(timeout=400) for p in procs]
    finally:
        kill_all(procs)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert f"resuming from step {second[-1]}" in outs[0][0], outs[0][0][-2000:]
    assert train_steps(run_dir, logged) == list(range(second[-1] + 1, TOTAL_STEPS + 1))  # only the rest
    status = read_status(run_dir)
    assert (status["state"], status["step"]) == ("completed", TOTAL_STEPS), status
    assert run_status(run_dir, stale_after=3)["state"] == "completed"


class FakeClient:
    """The coordination service's key-value store, in memory."""

    def __init__(self):
        self.kv, self.lock = {}, threading.Lock()

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.lock:
            self.kv[key] = value

    def key_value_dir_get(self, prefix):
        with self.lock:
            return [(k, v) for k, v in self.kv.items() if k.startswith(prefix + "/")]


def watch_pair(timeout=1.0):
    """Process 0's watch and process 1's, on one fake store; exits are recorded, not taken."""
    from kellen.train.distributed import PeerWatch

    client, exits, verdicts = FakeClient(), [], []
    watches = [PeerWatch(client, i, 2, timeout, exit=lambda code, i=i: exits.append((i, code))) for i in range(2)]
    watches[0].handler = lambda why, detail: verdicts.append(why)
    for w in watches:
        w.thread.start()
    return watches, exits, verdicts


@pytest.mark.fault(8, "peer watch: a silent peer is lost after the timeout; a beating or finished one "
                      "never; a failed one only if still awaited")
def test_peer_watch_declares_only_a_silent_peer_lost():
    def stop(watches):
        for w in watches:
            w.stopped.set()

    watches, exits, verdicts = watch_pair(timeout=10.0)  # beats every 2 s
    try:  # an error while the peers beat on: no lost peer, said after two more beats (not at 16 s)
        t = time.monotonic()
        assert watches[0].wait_for_verdict() is None and time.monotonic() - t < 12
    finally:
        stop(watches)

    watches, exits, verdicts = watch_pair(timeout=1.0)
    try:
        time.sleep(2.0)  # both beat for twice the timeout: nobody is lost
        assert exits == [] and verdicts == []
        watches[1].stopped.set()  # process 1 goes silent without signing off (kill -9)
        t = time.monotonic()
        while not exits and time.monotonic() - t < 10:
            time.sleep(0.05)
        assert exits == [(0, 1)], exits
        assert len(verdicts) == 1 and verdicts[0].startswith("peer process 1 lost (no heartbeat for 1 s)")
    finally:
        stop(watches)

    watches, exits, verdicts = watch_pair(timeout=1.0)
    try:
        time.sleep(0.5)
        watches[1].sign_off("done")  # finished on purpose: process 0 may still be writing its record
        time.sleep(2.0)
        assert exits == [] and verdicts == []
    finally:
        stop(watches)

    watches, exits, verdicts = watch_pair(timeout=1.0)
    try:
        time.sleep(0.5)
        watches[1].sign_off("failed")  # its own error, as process 0's: process 0 is not told "peer lost"
        assert watches[0].wait_for_verdict() is None
        time.sleep(2.0)  # but a process 0 still waiting for it gives up after the timeout
        assert exits == [(0, 1)] and verdicts[0].startswith("peer process 1 failed (see its log)"), verdicts
    finally:
        stop(watches)


@pytest.mark.fault(8, "distributed.heartbeat_timeout_seconds <= 0 is refused naming the key")
def test_bad_heartbeat_timeout_is_refused(tmp_path, tiny_sudoku):
    r = pretrain("+experiment=tiny", f"data_paths=[{tiny_sudoku}]", f"output_root={tmp_path}",
                 "distributed.heartbeat_timeout_seconds=0", timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "distributed.heartbeat_timeout_seconds" in r.stderr
    assert not (tmp_path / "adhoc").exists()
