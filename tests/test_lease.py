"""Run leases: one winner among concurrent acquirers (threads, processes, gs://), stale takeover,
refresh keeping a lease alive, release."""
import json
import logging
import subprocess
import sys
import threading
import time

import pytest

from kellen.experiments import lease as leases
from kellen.experiments.lease import Lease
from pretrain_helpers import REPO


def race(run_dir, n, **kw):
    """n threads acquire at once; returns the Lease objects that won."""
    barrier, won = threading.Barrier(n), []
    contenders = [Lease(run_dir, **kw) for _ in range(n)]

    def go(lease):
        barrier.wait()
        if lease.acquire():
            won.append(lease)

    threads = [threading.Thread(target=go, args=(c,)) for c in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won


def test_threads_exactly_one_wins_and_release_frees(tmp_path):
    run_dir = str(tmp_path / "g" / "run")
    won = race(run_dir, 8)
    assert len(won) == 1
    body = leases.read(run_dir)
    assert body["owner"]["token"] == won[0].owner["token"] and leases.is_live(body)
    assert not Lease(run_dir).acquire()
    won[0].release()
    assert leases.read(run_dir) is None
    again = Lease(run_dir)
    assert again.acquire()
    again.release()


HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from kellen.experiments.lease import Lease
while time.time() < {start}:
    time.sleep(0.001)
lease = Lease({run_dir!r})
print("won" if lease.acquire() else "lost", flush=True)
time.sleep(2.0)  # hold it while the others try
"""


@pytest.mark.fault(7, "run leases: of racing processes exactly one wins")
def test_processes_exactly_one_wins(tmp_path):
    run_dir = str(tmp_path / "run")
    code = HOLDER.format(repo=str(REPO), start=time.time() + 3.0, run_dir=run_dir)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(outs) == ["lost", "lost", "lost", "won"], outs
    assert leases.read(run_dir) is None  # released at exit (atexit)


def test_stale_lease_is_taken_over_and_logged(tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = {"owner": {"host": "gone-host", "pid": 1, "token": "dead"}, "heartbeat_unix": time.time() - 600,
            "expires_after_s": 60}
    (run_dir / "lease.json").write_text(json.dumps(dead))
    assert not leases.is_live(dead)
    lease = Lease(str(run_dir))
    with caplog.at_level(logging.WARNING, logger="kellen.experiments.lease"):
        assert lease.acquire()
    assert "taking over the stale lease" in caplog.text and "gone-host" in caplog.text
    assert leases.read(str(run_dir))["owner"]["token"] == lease.owner["token"]
    lease.release()


def test_refresh_keeps_it_alive_and_a_lost_lease_is_noticed(tmp_path):
    run_dir = str(tmp_path / "run")
    lease = Lease(run_dir, expires_after_s=0.6, refresh_every_s=0.1)
    assert lease.acquire()
    first = leases.read(run_dir)["heartbeat_unix"]
    time.sleep(1.5)  # well past the expiry: only the refresh thread keeps it live
    assert leases.read(run_dir)["heartbeat_unix"] > first
    assert not Lease(run_dir).acquire()
    # Someone overwrote it (a takeover after a long stall): the holder notices and lets go.
    body = dict(leases.read(run_dir), owner={"host": "other", "pid": 2, "token": "other"})
    with open(f"{run_dir}/lease.json", "w") as f:
        json.dump(body, f)
    deadline = time.time() + 5
    while not lease.lost and time.time() < deadline:
        time.sleep(0.05)
    assert lease.lost and not lease.held
    lease.release()  # not ours any more: left alone
    assert leases.read(run_dir)["owner"]["token"] == "other"


def test_context_manager_raises_when_held(tmp_path):
    run_dir = str(tmp_path / "run")
    with Lease(run_dir):
        with pytest.raises(leases.LeaseHeld):
            with Lease(run_dir):
                pass
    assert leases.read(run_dir) is None


@pytest.mark.fault(7, "run leases on gs://: exactly one holder, stale ones taken over")
def test_gcs_lease(gcs_prefix):
    run_dir = gcs_prefix + "g/run"
    won = race(run_dir, 4)
    assert len(won) == 1
    assert leases.read(run_dir)["owner"]["token"] == won[0].owner["token"]
    assert not Lease(run_dir).acquire()
    won[0].release()
    assert leases.read(run_dir) is None
    # A stale gs:// lease is taken over, conditionally on the generation that was read.
    from kellen import gcs

    gcs.write_text(run_dir + "/lease.json", json.dumps({"owner": {"host": "h", "pid": 1, "token": "dead"},
                                                        "heartbeat_unix": time.time() - 600, "expires_after_s": 60}))
    fresh = Lease(run_dir, expires_after_s=30, refresh_every_s=0.2)
    assert fresh.acquire()
    time.sleep(0.6)  # a refresh or two through if_generation_match
    assert fresh.held and not fresh.lost
    assert leases.read(run_dir)["owner"]["token"] == fresh.owner["token"]
    fresh.release()
    assert leases.read(run_dir) is None
