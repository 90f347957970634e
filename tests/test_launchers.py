"""Launchers: a real 2-worker JAX training run through the TPU VM launcher and a stand-in gcloud
(tests/fake_gcloud/gcloud, which accepts only the real command form), outcome aggregation, name
safety, secrets kept off command lines, and the --tmux relaunch on a private tmux server."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import types

import pytest

from kellen.experiments import launchers as L
from pretrain_helpers import REPO, TEST_CONFIGS

FAKE_GCLOUD = REPO / "tests" / "fake_gcloud"
SECRET = "wandb-secret-0123456789abcdef"
TARGET = types.SimpleNamespace(name="t")
PREFIX = ["compute", "tpus", "tpu-vm", "ssh", "pod-1", "--zone", "us-central2-b"]


@pytest.fixture
def pod(tmp_path, monkeypatch):
    """A fake slice: gcloud on PATH, a worker home whose ~/kellen is a checkout (links to this
    repo's files, so a stale-trainer sweep there touches no other test's processes)."""
    home = tmp_path / "home"
    checkout = home / "kellen"
    checkout.mkdir(parents=True)
    for name in ("pretrain_jax.py", "configs"):
        (checkout / name).symlink_to(REPO / name)
    monkeypatch.setenv("PATH", f"{FAKE_GCLOUD}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_LOG", str(tmp_path / "gcloud.jsonl"))
    monkeypatch.setenv("FAKE_GCLOUD_HOME", str(home))
    monkeypatch.setenv("FAKE_GCLOUD_WORKERS", "2")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)  # the launching machine's secret: must stay here
    return types.SimpleNamespace(home=home, checkout=checkout, log=tmp_path / "gcloud.jsonl",
                                 out=str(tmp_path / "stdout.log"), err=str(tmp_path / "stderr.log"))


def recorded(pod):
    return [json.loads(line) for line in pod.log.read_text().splitlines()] if pod.log.exists() else []


def launcher(**kw):
    return L.TpuVmLauncher("pod-1", "us-central2-b", python=sys.executable, free_tpu_devices=False, **kw)


def test_two_worker_training_run_through_gcloud(pod, tmp_path, tiny_sudoku, compile_cache):
    out = tmp_path / "out $(touch pwned) 'x'"  # reaches Hydra intact only if every word is quoted
    argv = ["--config-dir", str(TEST_CONFIGS), "+experiment=tiny", f"data_paths=[{tiny_sudoku}]",
            f'output_root="{out}"', "run_name=tpu.v1", f"compilation_cache_dir={compile_cache}", "max_steps=4"]
    env = {"WANDB_MODE": "disabled", "WANDB_API_KEY": SECRET, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--bogus"}
    rc = L.TpuVmLauncher("pod-1", "us-central2-b", project="proj-1", python=sys.executable,
                         free_tpu_devices=False).launch(TARGET, argv, env, pod.out, pod.err)
    stdout, stderr = pathlib.Path(pod.out).read_text(), pathlib.Path(pod.err).read_text()
    assert rc == 0, stderr[-3000:]
    run_dir = out / "adhoc" / "tpu.v1"
    meta = json.loads((run_dir / "metadata.json").read_text())
    assert meta["process_count"] == 2 and len(meta["hostnames"]) == 2
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    assert "KELLEN_WORKER_EXIT worker=0 code=0" in stdout and "KELLEN_WORKER_EXIT worker=1 code=0" in stdout
    assert "slice exit 0" in stderr
    assert not list(tmp_path.rglob("pwned")) and not (REPO / "pwned").exists()
    # forwarded: the non-secret W&B mode; not forwarded: the key, and this host's JAX/XLA settings
    assert meta["environment"].get("WANDB_MODE") == "disabled"
    assert "WANDB_API_KEY" not in meta["environment"] and "--bogus" not in json.dumps(meta)
    calls = recorded(pod)
    assert len(calls) == 2  # stale cleanup, then the run
    for call in calls:
        assert call[:11] == PREFIX + ["--project", "proj-1", "--worker=all", "--command"] and len(call) == 12
        assert SECRET not in json.dumps(call)
    assert "pkill" not in calls[0][-1] and "pgrep" in calls[0][-1] and "KELLEN_WORKER_READY" in calls[0][-1]
    assert "(cd ~/kellen && exec env WANDB_MODE=disabled " in calls[1][-1]


def test_stale_trainer_stopped_then_exit_codes_aggregate(pod, tmp_path):
    (pod.checkout / "pretrain_jax.py").unlink()  # a stand-in: worker 1 finds bad data, worker 0 finishes
    (pod.checkout / "pretrain_jax.py").write_text(
        "import os, sys\nsys.exit(2 if os.environ['KELLEN_PROCESS_ID'] == '1' else 0)\n")
    fake_trainer = [sys.executable, "-c", "import time; time.sleep(300)", "pretrain_jax.py"]
    stale = subprocess.Popen(fake_trainer, cwd=pod.checkout)  # left over in this checkout
    bystander = subprocess.Popen(fake_trainer, cwd=tmp_path)  # another checkout's: not ours to stop
    try:
        rc = launcher().launch(TARGET, ["x=1"], {}, pod.out, pod.err)
        assert stale.wait(timeout=10) is not None and bystander.poll() is None
    finally:
        for p in (stale, bystander):
            p.kill()
            p.wait()
    stdout, stderr = pathlib.Path(pod.out).read_text(), pathlib.Path(pod.err).read_text()
    assert rc == 2, stderr[-3000:]
    assert f"stopping stale trainers: {stale.pid}" in stdout
    assert "KELLEN_WORKER_EXIT worker=0 code=0" in stdout and "worker 1: exit code 2" in stderr
    assert all(c[:9] == PREFIX + ["--worker=all", "--command"] for c in recorded(pod))  # no --project


STAND_IN_TRAINER = """import os, signal, time
# os._exit: the fake's workers share this machine, so each trainer gets every worker's SIGTERM
signal.signal(signal.SIGTERM, signal.SIG_IGN if os.environ.get("STUBBORN") else lambda *a: os._exit(75))
print("trainer up", flush=True)
time.sleep(120)
"""


@pytest.fixture(autouse=True)
def default_sigint():
    """Ctrl-C must raise KeyboardInterrupt here whatever an earlier test in this process installed."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def interrupt_when(path, text, times, count=1):
    """Ctrl-C (SIGINT to the main thread) once `text` shows `times` times in `path`, `count` times."""
    import signal
    import threading

    main = threading.main_thread().ident

    def go():
        deadline = time.time() + 60
        while time.time() < deadline:
            if os.path.exists(path) and pathlib.Path(path).read_text().count(text) >= times:
                for _ in range(count):
                    signal.pthread_kill(main, signal.SIGINT)
                    time.sleep(1.0)
                return
            time.sleep(0.05)
    threading.Thread(target=go, daemon=True).start()


def trainer_pids(checkout):
    r = subprocess.run(["pgrep", "-f", "pretrain_jax[.]py"], capture_output=True, text=True)
    return [p for p in r.stdout.split() if os.path.realpath(f"/proc/{p}/cwd") == str(checkout.resolve())]


def test_ctrl_c_asks_every_worker_to_save_and_returns_75(pod):
    """A stand-in trainer that exits 75 on SIGTERM, as pretrain_jax.py does after saving."""
    (pod.checkout / "pretrain_jax.py").unlink()
    (pod.checkout / "pretrain_jax.py").write_text(STAND_IN_TRAINER)
    interrupt_when(pod.out, "trainer up", 2)
    assert launcher().launch(TARGET, ["x=1"], {}, pod.out, pod.err) == 75
    stderr = pathlib.Path(pod.err).read_text()
    assert "SIGTERM to the trainers on pod-1" in stderr and "slice exit 75" in stderr
    assert len(recorded(pod)) == 3 and "kill -TERM" in recorded(pod)[2][-1]
    assert trainer_pids(pod.checkout) == []


def test_second_ctrl_c_kills_and_reraises(pod, monkeypatch):
    (pod.checkout / "pretrain_jax.py").unlink()
    (pod.checkout / "pretrain_jax.py").write_text(STAND_IN_TRAINER)
    monkeypatch.setenv("STUBBORN", "1")  # a worker that would not stop on SIGTERM
    l = launcher(forward_env=("STUBBORN",))
    interrupt_when(pod.out, "trainer up", 2, count=2)
    with pytest.raises(KeyboardInterrupt):
        l.launch(TARGET, ["x=1"], {"STUBBORN": "1"}, pod.out, pod.err)
    assert "SIGKILL to the trainers" in pathlib.Path(pod.err).read_text()
    deadline = time.time() + 10
    while trainer_pids(pod.checkout) and time.time() < deadline:
        time.sleep(0.1)
    assert trainer_pids(pod.checkout) == []


def test_secret_in_an_override_is_refused_before_gcloud(pod):
    rc = launcher().launch(TARGET, [f"+note={SECRET}"], {}, pod.out, pod.err)
    assert rc == 2 and recorded(pod) == []
    assert "secret" in pathlib.Path(pod.err).read_text()


def test_unreachable_slice_fails_without_running(pod, monkeypatch):
    monkeypatch.setenv("FAKE_GCLOUD_WORKERS", "0")  # nobody answers the cleanup
    assert launcher().launch(TARGET, ["x=1"], {}, pod.out, pod.err) == 1
    assert len(recorded(pod)) == 1 and "cleanup on pod-1 failed" in pathlib.Path(pod.err).read_text()


def test_same_commit_on_every_worker(pod, tmp_path, monkeypatch):
    """A stand-in `git` on the workers' PATH: checkout records the commit, rev-parse reports it,
    except on a worker with its own head-<id> file."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "git").write_text('#!/bin/sh\ncase "$1" in\n  checkout) echo "$3" > "$HOME/head" ;;\n'
                              '  rev-parse) cat "$HOME/head-$KELLEN_PROCESS_ID" 2>/dev/null || cat "$HOME/head" ;;\n'
                              'esac\n')
    (stub / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub}{os.pathsep}{os.environ['PATH']}")
    commit, other = "a" * 40, "b" * 40
    assert launcher().ensure_same_commit(commit) == {"0": commit, "1": commit}
    assert "git checkout --quiet " + commit in recorded(pod)[0][-1]
    (pod.home / "head-1").write_text(other + "\n")
    with pytest.raises(L.LaunchError, match=f"worker 1 at {other}"):
        launcher().ensure_same_commit(commit)
    n = len(recorded(pod))
    assert launcher(commit=commit).launch(TARGET, ["x=1"], {}, pod.out, pod.err) == 1  # refused
    assert len(recorded(pod)) == n + 1 and "not at commit" in pathlib.Path(pod.err).read_text()


def test_fake_gcloud_accepts_only_the_real_form(tmp_path):
    gcloud = str(FAKE_GCLOUD / "gcloud")
    for bad in (["compute", "tpus", "tpu-vm", "ssh", "pod", "--zone", "z", "--command", "true"],
                ["compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=z", "--worker=all", "--command", "true"],
                ["compute", "ssh", "pod", "--zone", "z", "--worker=all", "--command", "true"]):
        r = subprocess.run([gcloud, *bad], capture_output=True, text=True,
                           env={**os.environ, "FAKE_GCLOUD_WORKERS": "1"})
        assert r.returncode == 2 and "usage" in r.stderr, bad
    ok = ["compute", "tpus", "tpu-vm", "ssh", "pod", "--zone", "z", "--worker=all", "--command",
          "echo $KELLEN_PROCESS_ID; exit 3"]
    r = subprocess.run([gcloud, *ok], capture_output=True, text=True, env={**os.environ, "FAKE_GCLOUD_WORKERS": "2"})
    assert r.returncode == 3 and sorted(r.stdout.split()) == ["0", "1"]


# ------------------------------------------------------------------ outcome aggregation (unit)
@pytest.mark.parametrize("codes,expected", [
    ({"0": "0", "1": "0"}, 0),
    ({"0": "0", "1": "75"}, 75),
    ({"0": "1", "1": "75"}, 75),  # preempted wins: the slice resumes
    ({"0": "0", "1": "1"}, 1),
    ({"0": "0", "1": "2", "2": "1"}, 2),  # the first non-zero, in worker order
    ({"0": "0"}, 1),  # worker 1 never reported
    ({"0": "0", "1": "oops"}, 1),
    ({}, 1),
])
def test_aggregate(codes, expected):
    code, problems = L.aggregate(codes, {"0", "1"} if codes else set())
    assert code == expected and bool(problems) == (expected != 0)


def test_markers_parse_from_interleaved_or_prefixed_output():
    lines = ["step 1 loss 2.3\n", "[worker 1] KELLEN_WORKER_EXIT worker=1 code=75\n",
             "10.0.0.2: KELLEN_WORKER_EXIT worker=0 code=0\n", "KELLEN_WORKER_READY worker=3 ok=1\n",
             "echo KELLEN_WORKER_EXIT worker=$w code=$rc\n"]  # the command echoed by a shell trace
    assert L.parse_markers(lines, "KELLEN_WORKER_EXIT") == {"1": "75", "0": "0", "$w": "$rc"}
    assert L.aggregate({"0": "0", "1": "75"}, ["0", "1"])[0] == 75


# ------------------------------------------------------------------ names and quoting
@pytest.mark.fault(11, "hostile TPU/zone/project names refused before gcloud runs")
@pytest.mark.parametrize("bad", ["a;rm -rf /", "$(touch x)", "x y", "../..", "..", "-oProxyCommand=x", "a\nb"])
@pytest.mark.parametrize("field", ["tpu", "zone", "project"])
def test_hostile_names_rejected_before_anything_runs(pod, bad, field):
    kw = {"tpu": "pod-1", "zone": "us-central2-b", "project": "p", field: bad}
    with pytest.raises(ValueError, match="unsafe"):
        L.TpuVmLauncher(**kw)
    assert recorded(pod) == []


def test_safe_values_and_quoting():
    assert L.safe_name("tpu.v1") == "tpu.v1" and L.safe_name("v4-64_b") == "v4-64_b"
    with pytest.raises(ValueError, match="unsafe TPU name ''"):
        L.TpuVmLauncher("", "z")
    assert L.remote_path("~/kellen dir") == "~/'kellen dir'" and L.remote_path("/opt/a b") == "'/opt/a b'"
    cmd = launcher().run_command(["run_name=tpu.v1", "x=$(touch y)", "a b"], {})
    assert "pretrain_jax.py run_name=tpu.v1 'x=$(touch y)' 'a b')" in cmd
    assert L.forwarded_env({"WANDB_MODE": "offline", "WANDB_API_KEY": SECRET, "JAX_PLATFORMS": "cpu"},
                           ("WANDB_MODE", "WANDB_API_KEY", "X")) == {"WANDB_MODE": "offline"}
    assert "fuser -k -9 /dev/accel*" in L.TpuVmLauncher("p", "z").cleanup_command()
    with pytest.raises(ValueError):
        L.TpuVmLauncher("p", "z", commit="HEAD; rm -rf ~")


def test_launcher_from_args():
    ns = types.SimpleNamespace(tpu="pod-1", zone="europe-west4-a", project="proj")
    tpu = L.launcher_from_args(ns)
    assert isinstance(tpu, L.TpuVmLauncher) and tpu.ssh_argv("true")[1:] == \
        PREFIX[:5] + ["--zone", "europe-west4-a", "--project", "proj", "--worker=all", "--command", "true"]
    with pytest.raises(ValueError):
        L.launcher_from_args(types.SimpleNamespace(tpu="pod-1", zone=None, project=None))


# ------------------------------------------------------------------ tmux
def test_tmux_session_names_and_flag_stripping():
    assert L.tmux_session_name(None, "exp03*") == "kellen-exp03"
    assert L.tmux_session_name(None, "exp03_a,exp04*") == "kellen-exp03_a-exp04"
    assert L.tmux_session_name("mine-1", "exp03*") == "mine-1" and L.tmux_session_name("batch-exp0.3") == "batch-exp0_3"
    for bad in ("a:b", "x y", "-t", "$(x)"):
        with pytest.raises(ValueError):
            L.tmux_session_name(bad, "d")
    assert L._strip_tmux_flag(["exp03*", "--tmux", "s1", "--dry-run"], "s1") == ["exp03*", "--dry-run"]
    assert L._strip_tmux_flag(["--tmux", "exp03*"], None) == ["exp03*"]
    assert L._strip_tmux_flag(["--tmux=s1", "exp03*"], "s1") == ["exp03*"]


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
@pytest.mark.parametrize("form", ["sys.argv", "command"])
def test_relaunch_in_tmux(tmp_path, monkeypatch, capsys, form):
    socket = f"kellen-test-{os.getpid()}"
    monkeypatch.setenv(L.TMUX_SOCKET_ENV, socket)  # a private server: never the user's
    monkeypatch.setenv("KELLEN_TEST_TOKEN", SECRET)  # inherited by environment, not argv
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the 0600 hand-over file lives, briefly
    script, done = tmp_path / "job.py", tmp_path / "done.json"
    script.write_text("import json, os, sys\n"
                      "json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd(),"
                      " 'token': os.environ.get('KELLEN_TEST_TOKEN')},"
                      " open(sys.argv[1], 'w'))\n")
    session = f"kellen-test-{os.getpid()}-{form[0]}"
    argv = [str(script), str(done), "--tmux", session, "a b", "$(touch pwned)"]
    if form == "command":  # as the batch scripts call it: the whole command, --tmux already gone
        argv = [sys.executable, str(script), str(done), "a b", "$(touch pwned)"]
    tmux = ["tmux", "-L", socket]
    try:
        extra = () if form == "command" else ("exp03*",)
        assert L.relaunch_in_tmux(argv, session, *extra) == 0
        assert f"tmux -L {socket} attach -t {session}" in capsys.readouterr().out
        assert subprocess.run(tmux + ["has-session", "-t", f"={session}"]).returncode == 0
        deadline = time.time() + 30
        while not done.exists() and time.time() < deadline:
            time.sleep(0.1)
        got = json.loads(done.read_text())
        assert got == {"argv": [str(done), "a b", "$(touch pwned)"], "cwd": str(REPO), "token": SECRET}
        assert L.relaunch_in_tmux(argv, session, "exp03*") == 2  # the name is taken
        assert "already exists" in capsys.readouterr().err
        while time.time() < deadline:  # the pane stays, dead, its output on screen (remain-on-exit)
            dead = subprocess.run(tmux + ["list-panes", "-t", f"={session}:", "-F", "#{pane_dead}"],
                                  capture_output=True, text=True).stdout.split()
            if dead == ["1"]:
                break
            time.sleep(0.1)
        screen = subprocess.run(tmux + ["capture-pane", "-p", "-t", f"={session}:"], capture_output=True,
                                text=True).stdout
        assert dead == ["1"] and "[kellen] exited with code 0" in screen
        assert not list(tmp_path.glob("kellen-tmux-*")) and not (REPO / "pwned").exists()
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True)
