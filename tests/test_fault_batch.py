"""Fault-injection scenarios of the batch runner, through the real scripts and real trainers:

 6  the batch runner is stopped (SIGINT) and killed (SIGKILL) mid-batch and started again:
    completed runs are not re-run, the interrupted run resumes from its checkpoint, and a killed
    batch's trainer never shares its run dir with a second trainer;
10  secrets in the environment (W&B key, Google credentials file, token URLs, GITHUB_TOKEN) appear
    in no file a batch writes: run dirs, W&B offline files (binary .wandb too), batch logs, the
    tmux pane; an override carrying a credential is refused without echoing it;
11  hostile names and values (; $() backticks spaces .. /) in spec group ids and run names,
    --pattern, override values and tmux session names: refused (one line, exit 2, nothing run) or
    passed as one argv element, with no file outside the output root and no canary `touch`ed.
"""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from kellen import procs
from kellen.experiments import generate as gen
from kellen.experiments import local_launcher
from kellen.experiments import run_experiment as run_one
from kellen.experiments import run_experiment_batch as run_batch
from pretrain_helpers import REPO, clean_env
from test_batch_runner import BATCH, batch_states, num_starts, train_rows, write_config

HAVE_TMUX = shutil.which("tmux") is not None


def start(args, env, stdout_path, cfg, out, logs):
    """run_experiment_batch.py as a real process; its console goes to a file we can poll."""
    cmd = [sys.executable, BATCH, *map(str, args), "--config-dir", str(cfg), "--output-root", str(out),
           "--logs-dir", str(logs)]
    f = open(stdout_path, "w")
    try:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    finally:
        f.close()


def wait_until(cond, proc, what, timeout=240):
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"batch exited ({proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def read_json(path):
    return json.loads(path.read_text())


def mtimes(root):
    return {str(p): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def segments(run_dir):
    """The train steps logged by each trainer start, in file order (a start logs num_params first)."""
    out = []
    for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "num_params" in row:
            out.append({"start": row["step"], "steps": []})
        elif "train/lm_loss" in row:
            out[-1]["steps"].append(row["step"])
    return out


# ------------------------------------------------------------------------------------------ 6
def completed_record(run_dir):
    """A finished run's record (status, metrics, a checkpoint), as a trainer leaves it."""
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "checkpoints" / "16").mkdir(parents=True)
    (run_dir / "checkpoints" / "16" / "meta").write_text("{}")
    (run_dir / "logs" / "metrics.jsonl").write_text('{"step": 0, "num_params": 1}\n')
    (run_dir / "status.json").write_text(json.dumps({"state": "completed", "step": 16, "total": 16, "metrics": {},
                                                     "heartbeat_unix": time.time(), "host": "h", "pid": 1}))


@pytest.mark.fault(6, "batch SIGINTed, then SIGKILLed, restarted: no rerun, resumes twice, one trainer at a time")
def test_killed_batch_restarts_without_rerun_or_a_second_trainer(tmp_path, tiny_sudoku, compile_cache):
    cfg, out, logs = tmp_path / "configs", tmp_path / "runs", tmp_path / "logs"
    for name in ("k6_a", "k6_b"):  # 16 steps; the config of test_batch_runner, so compiled steps are cached
        write_config(cfg, name, tiny_sudoku, compile_cache)
    a_dir, b_dir = out / "tb" / "k6_a", out / "tb" / "k6_b"
    completed_record(a_dir)
    a_files = mtimes(a_dir)
    env = clean_env({"KELLEN_ORPHAN_WAIT_S": "240"})
    started, orphan = [], None

    def batch(n):
        started.append(start(["k6_a", "k6_b"], env, tmp_path / f"b{n}.txt", cfg, out, logs))
        return started[-1]

    try:
        # (a) SIGINT to the batch: forwarded to k6_b's trainer, which saves and exits 75.
        first = batch(1)
        wait_until(lambda: train_rows(b_dir) >= 2, first, "k6_b training")
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=240) == 75, (tmp_path / "b1.txt").read_text()
        runs1 = batch_states(logs)[0]["runs"]
        assert (runs1["k6_b"]["state"], runs1["k6_b"]["exit_codes"]) == ("preempted", [75])
        status = read_json(b_dir / "status.json")
        step1 = status["step"]
        assert status["state"] == "preempted" and 0 < step1 < 16
        assert not (b_dir / "lease.json").exists()

        # (b) The same batch again resumes k6_b; then it is SIGKILLed. Its trainer is stopped first
        # (SIGSTOP), so that it is surely still alive when the next batch looks at the run.
        second = batch(2)
        wait_until(lambda: train_rows(b_dir) >= step1 + 2, second, "k6_b training again")
        status, lease = read_json(b_dir / "status.json"), read_json(b_dir / "lease.json")
        orphan = status["pid"]
        assert status["state"] == "running" and lease["owner"]["pid"] == second.pid
        assert lease["trainer"]["pid"] == orphan  # the lease names the trainer its batch started
        os.kill(orphan, signal.SIGSTOP)
        second.kill()
        second.wait(timeout=60)
        assert procs.pid_alive(orphan)  # it outlived its batch (stopped: it cannot act on SIGTERM yet)

        # A third batch at once: the dead batch's lease is taken over now (not after its 300 s
        # expiry), and it waits for the orphan instead of starting a second trainer on k6_b.
        third = batch(3)
        wait_until(lambda: "waiting up to" in (tmp_path / "b3.txt").read_text(), third, "the wait", timeout=120)
        assert read_json(b_dir / "lease.json")["owner"]["pid"] == third.pid
        time.sleep(1.0)
        assert num_starts(b_dir) == 2 and third.poll() is None  # nothing started beside the orphan
        os.kill(orphan, signal.SIGCONT)  # now it gets its parent-death SIGTERM: saves, exits 75
        assert third.wait(timeout=300) == 0, (tmp_path / "b3.txt").read_text()
    finally:
        if orphan is not None and procs.pid_alive(orphan):
            os.kill(orphan, signal.SIGCONT)
            os.kill(orphan, signal.SIGKILL)
        for p in started:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not procs.pid_alive(orphan)
    b1, b2, b3 = [logs / b for b in sorted(os.listdir(logs))]
    assert f"resuming from step {step1}" in (b2 / "k6_b.out").read_text()
    preempted = re.search(r"preempted at step (\d+)", (b2 / "k6_b.err").read_text())
    assert preempted, "the orphan did not save and exit as preempted"
    step2 = int(preempted.group(1))
    assert step1 + 2 <= step2 < 16
    assert f"resuming from step {step2}" in (b3 / "k6_b.out").read_text()
    states = batch_states(logs)
    for n, body in enumerate(states):  # the completed run: skipped by every batch, its files untouched
        assert (body["runs"]["k6_a"]["state"], body["runs"]["k6_a"]["detail"]) == ("skipped", "skip: completed"), n
    assert mtimes(a_dir) == a_files
    last = states[2]["runs"]["k6_b"]
    assert (last["decision"], last["state"], last["exit_codes"]) == ("resume", "completed", [0])
    assert read_json(b_dir / "status.json")["state"] == "completed" and not (b_dir / "lease.json").exists()
    # Three starts, one after the other: steps 1..N1, N1+1..N2, N2+1..16. Two trainers at once would
    # interleave their rows, or the later one would resume from an older checkpoint.
    segs = segments(b_dir)
    assert [s["start"] for s in segs] == [0, step1, step2], segs
    assert len(list(b_dir.glob("metadata.resume-*.json"))) == 2
    assert (b_dir / "logs" / "train.log").read_text().count(f"run dir {b_dir}\n") == 3
    assert [s["steps"] for s in segs] == [list(range(1, step1 + 1)), list(range(step1 + 1, step2 + 1)),
                                          list(range(step2 + 1, 17))]


# ------------------------------------------------------------------------------------------ 10
API_KEY = "wandbFAKEk3y0123456789abcdef0123456789abcd"
GITHUB = "ghp_FAKEgithubT0KEN0123456789abcdefABCD"
URL_TOKEN, URL_PASS, QUERY_TOKEN = "tok3n-SECRET-u1", "mirr0r-PASS-w0rd", "qtok-SECRET-q1"
WB_URL_PASS = "wbURL-pass-SECRET"
PEM_LINES = ["MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCfakeKEYbodyLINE1",
             "QWERTYfakeKEYbodyLINE2xyzxyzxyzxyzxyz0123456789abcdefABCDEF"]
KEY_ID = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"


def secret_env(tmp_path):
    creds = tmp_path / "creds" / "sa.json"
    creds.parent.mkdir()
    creds.write_text(json.dumps({
        "type": "service_account", "project_id": "proj-x", "private_key_id": KEY_ID,
        "private_key": "-----BEGIN PRIVATE KEY-----\n" + "\n".join(PEM_LINES) + "\n-----END PRIVATE KEY-----\n",
        "client_email": "trainer@proj-secret-sa.iam.gserviceaccount.com"}))
    (tmp_path / "tmpdir").mkdir()
    env = clean_env({
        "WANDB_MODE": "offline", "WANDB_API_KEY": API_KEY, "GITHUB_TOKEN": GITHUB,
        "GOOGLE_APPLICATION_CREDENTIALS": str(creds),
        "HF_ENDPOINT": f"https://user:{URL_TOKEN}@hf.example.com/x",
        "KELLEN_MIRROR_URL": f"https://mirror:{URL_PASS}@data.example.com/d?token={QUERY_TOKEN}",
        "WANDB_BASE_URL": f"https://wb:{WB_URL_PASS}@wandb.example.com",
        "WANDB_CONFIG_DIR": str(tmp_path / "wb" / "config"), "WANDB_CACHE_DIR": str(tmp_path / "wb" / "cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wb" / "data"), "TMPDIR": str(tmp_path / "tmpdir"),
        "KELLEN_TMUX_SOCKET": f"kellen-fault10-{os.getpid()}"})
    secrets = [API_KEY, GITHUB, URL_TOKEN, URL_PASS, QUERY_TOKEN, WB_URL_PASS, KEY_ID, *PEM_LINES,
               "proj-secret-sa", str(creds)]
    return env, secrets


def leaks(roots, secrets):
    """(file, secret) for every secret found in any file under `roots`, read as bytes."""
    found, seen = [], 0
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                with open(path, "rb") as f:
                    data = f.read()
                seen += 1
                found += [(path, s) for s in secrets if s.encode() in data]
    return found, seen


def tmux(env, *args):
    return subprocess.run(["tmux", "-L", env["KELLEN_TMUX_SOCKET"], *args], capture_output=True, text=True,
                          env=env)


def wait_for_dead_pane(env, session, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if tmux(env, "list-panes", "-t", f"={session}:", "-F", "#{pane_dead}").stdout.split() == ["1"]:
            return tmux(env, "capture-pane", "-p", "-S", "-", "-E", "-", "-t", f"={session}:").stdout
        time.sleep(0.2)
    raise AssertionError(f"tmux session {session} still running after {timeout}s")


@pytest.mark.fault(10, "secrets: none in run dirs, W&B files, batch logs, tmux pane; refused in overrides")
def test_secrets_reach_no_file(tmp_path, tiny_sudoku, compile_cache):
    cfg, out, logs = tmp_path / "configs", tmp_path / "runs", tmp_path / "logs"
    write_config(cfg, "s10_a", tiny_sudoku, compile_cache)  # as scenario 6: its compiled steps are cached
    env, secrets = secret_env(tmp_path)
    base = [sys.executable, BATCH, "s10_a", "--config-dir", str(cfg), "--output-root", str(out),
            "--logs-dir", str(logs)]

    # Overrides carrying a credential are refused before anything runs, and not echoed; neither
    # is a secret in a mistyped option (argparse quotes what it did not understand).
    for bad in (f"wandb.notes=see https://user:{URL_TOKEN}@host/x", f"wandb.notes={API_KEY}",
                f"+data_url=https://h/x?token={QUERY_TOKEN}", f"--no-such-flag=https://u:{URL_TOKEN}@h/x"):
        res = subprocess.run(base + [bad], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, (bad, res.stdout, res.stderr)
        why = "unrecognized" if bad.startswith("--") else "credential"
        assert len(res.stderr.strip().splitlines()) == 1 and why in res.stderr, res.stderr
        assert not any(s in res.stdout + res.stderr for s in secrets), res.stderr
    assert not out.exists() and not logs.exists()

    # The real batch, detached in tmux (where the researcher runs it), with W&B offline.
    session = f"kellen-fault10-{os.getpid()}"
    tmux_used = HAVE_TMUX
    try:
        if tmux_used:
            res = subprocess.run(base + ["--tmux", session], cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=120)
            assert res.returncode == 0, res.stdout + res.stderr
            console = res.stdout + res.stderr + wait_for_dead_pane(env, session)
            assert "[kellen] exited with code 0" in console, console[-3000:]
        else:
            res = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
            console = res.stdout + res.stderr
    finally:
        if tmux_used:
            tmux(env, "kill-server")
    run_dir = out / "tb" / "s10_a"
    assert read_json(run_dir / "status.json")["state"] == "completed"
    wandb_files = list(run_dir.glob("wandb/offline-run-*/*.wandb"))
    assert wandb_files and wandb_files[0].stat().st_size > 1000, "no offline W&B run was written"
    # The secrets did reach the trainer (so their absence below means something): masked by name.
    captured = read_json(run_dir / "metadata.json")["environment"]
    assert captured["WANDB_API_KEY"] == "<redacted>" and captured["GOOGLE_APPLICATION_CREDENTIALS"] == "<redacted>"
    assert captured["KELLEN_MIRROR_URL"].startswith("https://<redacted>@data.example.com/d?token=<redacted>")
    (batch_dir,) = [logs / b for b in os.listdir(logs)]
    assert (batch_dir / "batch_status.json").exists() and (batch_dir / "s10_a.out").stat().st_size > 0
    assert not list((tmp_path / "tmpdir").glob("kellen-tmux-*"))  # the hand-over file is gone

    roots = [out, logs, tmp_path / "wb", tmp_path / "tmpdir", compile_cache]
    found, seen = leaks(roots, secrets)
    assert seen > 20 and not found, found
    assert not [s for s in secrets if s in console], "a secret reached the console"


# ------------------------------------------------------------------------------------------ 11
CANARY = "{tmp}/PWNED"
# (case id, argv for run_experiment_batch.py; {tmp} {out} {canary} are filled in)
REFUSED = [
    ("run_name-semicolon", ["k11_a", "run_name=x;touch {canary}"]),
    ("run_name-subst", ["k11_a", "run_name=$(touch {canary})"]),
    ("run_name-backticks", ["k11_a", "run_name=`touch {canary}`"]),
    ("run_name-space", ["k11_a", "run_name=a b"]),
    ("run_name-dotdot", ["k11_a", "run_name=.."]),
    ("run_name-slash", ["k11_a", "run_name=../../x"]),
    ("group-dotdot", ["k11_a", "group=../.."]),
    ("group-slash", ["k11_a", "+group=x/../../y"]),
    ("output_root-escape", ["k11_a", "output_root=../../escape"]),
    ("checkpoint_path-dotdot", ["k11_a", "checkpoint_path={out}/../../escape"]),
    ("hydra-run-dir", ["k11_a", "hydra.run.dir={tmp}/escape"]),
    ("hydra-job-logging", ["k11_a", "hydra/job_logging=default"]),
    ("key-dotdot", ["k11_a", "+arch/../../../escape=1"]),
    ("pattern-subst", ["--pattern", "k11*$(touch {canary})"]),
    ("pattern-backticks-space", ["--pattern", "k11 `touch {canary}`"]),
    ("pattern-slash", ["--pattern", "*/../*"]),
    ("tmux-session", ["k11_a", "--tmux", "s;touch {canary}"]),
]
# Values a run may legitimately carry: passed on as one argv word each.
ALLOWED = [
    ("notes-space-semicolon", "wandb.notes='a b;touch {canary}'"),
    ("notes-subst-backticks", "wandb.notes='$(touch {canary})`touch {canary}`'"),
    ("tags-quote-dollar", "wandb.tags=[\"x'$HOME\",\"y z\"]"),
]
SPECS = [  # (case id, spec file stem, spec text); kellen generate must refuse each
    ("id-subst", "g11", 'id: "$(touch {canary})"\n'),
    ("id-dotdot", "g11", 'id: ".."\n'),
    ("name-semicolon", "g11", "id: g11\nnames: ['x;touch {canary}']\n"),
    ("name-backticks", "g11", "id: g11\nnames: ['`touch {canary}`']\n"),
    ("name-dotdot", "g11", "id: g11\nnames: ['..']\n"),
    ("name-slash", "g11", "id: g11\nnames: ['../../x']\n"),
    ("name-space", "g11", "id: g11\nnames: ['a b']\n"),
    ("name-newline", "g11", 'id: g11\nnames: ["ok\\n"]\n'),
    ("cli-group-dotdot", "../outside", "id: outside\n"),
    ("cli-group-subst", "$(touch {canary})", "id: x\n"),
]
SPEC_RUNS = "variables:\n  runs:\n    - {values: {lr: 1.0e-3}}\n"


@pytest.fixture
def hostile(tmp_path, monkeypatch, tiny_sudoku, compile_cache):
    """A config dir with k11_a, a fake pretrain_jax.py that records its argv, and a file snapshot."""
    cfg, out, logs = tmp_path / "configs", tmp_path / "runs", tmp_path / "logs"
    write_config(cfg, "k11_a", tiny_sudoku, compile_cache)
    write_config(cfg, "k11_nodata", str(tmp_path / "no-data"), compile_cache)
    fake, calls = tmp_path / "fake_pretrain.py", tmp_path / "calls.jsonl"
    fake.write_text("import json, os, sys\n"
                    f"open({str(calls)!r}, 'a').write(json.dumps({{'argv': sys.argv[1:], 'cwd': os.getcwd()}}) + '\\n')\n")
    monkeypatch.setattr(local_launcher, "PRETRAIN", str(fake))
    monkeypatch.setenv("KELLEN_TMUX_SOCKET", f"kellen-fault11-{os.getpid()}")  # never the user's tmux
    before = {p for p in tmp_path.rglob("*")}

    def fill(s):
        return s.format(tmp=tmp_path, out=out, canary=CANARY.format(tmp=tmp_path))

    def new_files():
        """Files and dirs created since the fixture, outside the output root and the logs dir."""
        return sorted(str(p) for p in tmp_path.rglob("*") if p not in before and p != calls
                      and out not in p.parents and p != out and logs not in p.parents and p != logs)

    def no_escape():
        canary = tmp_path / "PWNED"
        assert not canary.exists() and not (REPO / "PWNED").exists() and not (REPO / "x;touch").exists()
        assert not os.path.exists(os.path.normpath(os.path.join(REPO, "../../escape")))
        assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()
        assert new_files() == []

    common = ["--config-dir", str(cfg), "--output-root", str(out), "--logs-dir", str(logs)]
    return dict(cfg=cfg, out=out, logs=logs, calls=calls, fill=fill, no_escape=no_escape, common=common,
                tmp=tmp_path)


def one_error_line(err):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.fault(11, "hostile names/values: refused with one line, exit 2, nothing run or written")
@pytest.mark.parametrize("case,args", REFUSED, ids=[c for c, _ in REFUSED])
def test_hostile_batch_arguments_are_refused(hostile, capsys, case, args):
    h = hostile
    argv = [h["fill"](a) for a in args]
    assert run_batch.main(argv + h["common"]) == 2, case
    line = one_error_line(capsys.readouterr().err)
    assert "invalid" in line or "unsafe" in line, line
    if argv[0] == "k11_a" and "--tmux" not in argv:  # the single-run script refuses the same
        assert run_one.main(argv + h["common"]) == 2, case
        one_error_line(capsys.readouterr().err)
    assert not h["out"].exists() and not h["logs"].exists() and not h["calls"].exists()
    h["no_escape"]()


@pytest.mark.fault(11, "hostile override values that are allowed reach the trainer as one argv word")
@pytest.mark.parametrize("case,override", ALLOWED, ids=[c for c, _ in ALLOWED])
def test_hostile_values_travel_as_one_argv_word(hostile, capsys, case, override):
    h = hostile
    value = h["fill"](override)
    assert run_batch.main(["k11_a", value] + h["common"]) == 0, capsys.readouterr()
    assert run_one.main(["k11_a", value] + h["common"]) == 0  # the fake left no record: it runs again
    calls = [json.loads(line) for line in h["calls"].read_text().splitlines()]
    assert len(calls) == 2 and calls[0] == calls[1] and calls[0]["cwd"] == str(REPO)
    assert calls[0]["argv"].count(value) == 1 and calls[0]["argv"][-2:] == [value, f"output_root={h['out']}"]
    batch = json.loads(next(h["logs"].glob("*/batch_status.json")).read_text())
    assert value in batch["argv"]
    # A dry run shows the trainer's command as a shell line that splits back into the same words.
    capsys.readouterr()
    assert run_one.main(["k11_a", value, "--dry-run"] + h["common"]) == 0
    shown = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("# command: ")]
    words = shlex.split(shown[0][len("# command: "):])
    assert words[:2] == ["python", "pretrain_jax.py"] and value in words
    assert words[2:] == calls[0]["argv"]
    h["no_escape"]()


@pytest.mark.fault(11, "hostile spec group ids / run names: kellen generate refuses, writes nothing")
@pytest.mark.parametrize("case,stem,text", SPECS, ids=[c for c, _, _ in SPECS])
def test_hostile_spec_names_are_refused(hostile, capsys, case, stem, text):
    h = hostile
    specs, gen_out = h["tmp"] / "specs", h["tmp"] / "gen_out"
    specs.mkdir()
    gen_out.mkdir()
    stem = h["fill"](stem)
    if "$(" not in stem:  # a spec file the id names (../outside: one beside the spec folder)
        with open(os.path.normpath(specs / f"{stem}.yaml"), "w") as f:
            f.write(h["fill"](text) + "fixed: {epochs: 2}\n" + SPEC_RUNS)
    before = {p for p in h["tmp"].rglob("*")}
    assert gen.main(["generate", stem, "--spec-dir", str(specs), "--out", str(gen_out)]) == 2, case
    err = capsys.readouterr().err
    one_error_line(err)
    assert sorted(p for p in h["tmp"].rglob("*") if p not in before) == []  # nothing written anywhere
    assert os.listdir(gen_out) == []
    assert not (h["tmp"] / "PWNED").exists()


@pytest.mark.skipif(not HAVE_TMUX, reason="needs tmux")
@pytest.mark.fault(11, "tmux relaunch with a hostile override value: one argv word, no shell")
def test_hostile_value_through_tmux(hostile):
    h = hostile
    value = h["fill"]("wandb.notes='$(touch {canary}); `touch {canary}` a b'")
    env = clean_env({"KELLEN_TMUX_SOCKET": os.environ["KELLEN_TMUX_SOCKET"], "TMPDIR": str(h["tmp"])})
    session = f"kellen-fault11-{os.getpid()}"
    # k11_nodata has no dataset: the batch plans it `blocked` and ends, after all the same plumbing.
    cmd = [sys.executable, BATCH, "k11_nodata", value, *h["common"], "--tmux", session]
    try:
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        screen = wait_for_dead_pane(env, session, timeout=120)
    finally:
        tmux(env, "kill-server")
    assert "blocked: dataset" in screen and "[kellen] exited with code 1" in screen, screen
    (state,) = [json.loads(p.read_text()) for p in h["logs"].glob("*/batch_status.json")]
    assert state["argv"][2:4] == ["k11_nodata", value]  # one word, as typed
    assert state["runs"]["k11_nodata"]["state"] == "blocked"
    assert not list(h["tmp"].glob("kellen-tmux-*"))
    h["no_escape"]()
