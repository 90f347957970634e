"""The batch runner, run_experiment.py and `kellen status` as the researcher uses them: real
subprocesses of the scripts, which run real pretrain_jax.py subprocesses on the tiny config."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kellen.experiments import runs
from pretrain_helpers import REPO, clean_env

BATCH = str(REPO / "kellen" / "experiments" / "run_experiment_batch.py")
RUN = str(REPO / "kellen" / "experiments" / "run_experiment.py")
STATUS = str(REPO / "kellen" / "experiments" / "status_cli.py")

TINY = """# Generated from configs/experiments/tb.yaml (test fixture)
defaults:
  - cfg_pretrain
  - _self_
group: tb
global_batch_size: 16
epochs: {epochs}
eval_interval: {eval_interval}
lr: {lr}
lr_warmup_steps: 2
puzzle_emb_lr: 1.0e-2
ema: true
arch: {{hidden_size: 32, num_heads: 4, H_cycles: 2, L_cycles: 2, L_layers: 1, halt_max_steps: 3,
        puzzle_emb_len: 1, forward_dtype: float32}}
data_paths: [{data}]
compilation_cache_dir: {cache}
"""


def write_config(config_dir, name, data, cache, epochs=4, eval_interval=2, lr=1e-3, extra=""):
    config_dir.mkdir(parents=True, exist_ok=True)
    text = TINY.format(epochs=epochs, eval_interval=eval_interval, lr=lr, data=data, cache=cache) + extra
    (config_dir / f"{name}.yaml").write_text(text)


def script(path, *args, config_dir, out, logs=None, popen=False, timeout=600):
    cmd = [sys.executable, path, *map(str, args), "--config-dir", str(config_dir), "--output-root", str(out)]
    if logs is not None:
        cmd += ["--logs-dir", str(logs)]
    if popen:
        return subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def batch_states(logs):
    """[batch_status.json bodies] under a logs dir, oldest first."""
    return [json.loads((logs / b / "batch_status.json").read_text()) for b in sorted(os.listdir(logs))]


def num_starts(run_dir):
    """How many times a trainer started in this run dir (one num_params row per start)."""
    path = run_dir / "logs" / "metrics.jsonl"
    return sum('"num_params"' in line for line in path.read_text().splitlines()) if path.exists() else 0


def train_rows(run_dir):
    path = run_dir / "logs" / "metrics.jsonl"
    return sum('"train/lm_loss"' in line for line in path.read_text().splitlines()) if path.exists() else 0


def test_batch_completes_fails_preempts_then_resumes(tmp_path, tiny_sudoku, compile_cache):
    cfg, out, logs = tmp_path / "configs", tmp_path / "runs", tmp_path / "logs"
    write_config(cfg, "b01_ok", tiny_sudoku, compile_cache)
    write_config(cfg, "b01_fail", tiny_sudoku, compile_cache, lr=1e30)  # NaN loss -> exit 1
    write_config(cfg, "b01_pre", tiny_sudoku, compile_cache, epochs=12, eval_interval=6)
    pre_dir = out / "tb" / "b01_pre"

    # `--pattern b01` selects b01_* (the researcher's habit); runs go in name order, b01_pre last.
    proc = script(BATCH, "--pattern", "b01", config_dir=cfg, out=out, logs=logs, popen=True)
    try:
        deadline = time.time() + 240
        while train_rows(pre_dir) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)  # forwarded to b01_pre, which saves and exits 75
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, stdout + stderr
    (first,) = batch_states(logs)
    assert first["state"] == "interrupted" and first["exit_code"] == 75
    r = first["runs"]
    assert list(r) == ["b01_fail", "b01_ok", "b01_pre"]
    assert (r["b01_ok"]["state"], r["b01_ok"]["exit_codes"], r["b01_ok"]["step"]) == ("completed", [0], 16)
    assert (r["b01_fail"]["state"], r["b01_fail"]["exit_codes"]) == ("failed", [1])
    assert (r["b01_pre"]["state"], r["b01_pre"]["exit_codes"]) == ("preempted", [75])
    assert r["b01_ok"]["exact_accuracy"] is not None and r["b01_ok"]["wall_s"] > 0
    assert os.path.exists(r["b01_pre"]["stdout"]) and os.path.exists(r["b01_fail"]["stderr"])
    status = json.loads((pre_dir / "status.json").read_text())
    assert status["state"] == "preempted" and 0 < status["step"] < 48
    assert not (pre_dir / "lease.json").exists()  # released

    # The same command again: skip the completed, resume the preempted, leave the failed alone.
    again = script(BATCH, "--pattern", "b01", config_dir=cfg, out=out, logs=logs)
    assert again.returncode == 1, again.stdout + again.stderr  # b01_fail is still failed
    assert f"resume from step {status['step']}" in again.stdout
    second = batch_states(logs)[1]["runs"]
    assert second["b01_ok"]["state"] == "skipped" and second["b01_ok"]["detail"] == "skip: completed"
    assert second["b01_fail"]["state"] == "skipped" and second["b01_fail"]["exit_codes"] == []
    assert "--retry-failed" in second["b01_fail"]["detail"]
    assert (second["b01_pre"]["decision"], second["b01_pre"]["state"]) == ("resume", "completed")
    assert second["b01_pre"]["step"] == 48
    assert f"resuming from step {status['step']}" in open(second["b01_pre"]["stdout"]).read()
    assert num_starts(out / "tb" / "b01_ok") == 1 and num_starts(pre_dir) == 2
    assert json.loads((pre_dir / "status.json").read_text())["state"] == "completed"
    assert "EXACT_ACC" in again.stdout and "b01_pre" in again.stdout.split("EXACT_ACC")[1]


@pytest.mark.fault(7, "two batch runners on one pattern at once: each run executes exactly once")
def test_two_concurrent_batches_run_each_run_once(tmp_path, tiny_sudoku, compile_cache):
    cfg, out = tmp_path / "configs", tmp_path / "runs"
    for name in ("c01_a", "c01_b"):
        write_config(cfg, name, tiny_sudoku, compile_cache, epochs=2, eval_interval=2)
    logs = [tmp_path / "logs1", tmp_path / "logs2"]
    procs = [script(BATCH, "--pattern", "c01_*", config_dir=cfg, out=out, logs=lg, popen=True) for lg in logs]
    results = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    states = [batch_states(lg)[0]["runs"] for lg in logs]
    for name in ("c01_a", "c01_b"):
        assert num_starts(out / "tb" / name) == 1, name
        ran = [s[name] for s in states if s[name]["exit_codes"]]
        assert len(ran) == 1 and ran[0]["exit_codes"] == [0] and ran[0]["state"] == "completed"
        other = [s[name] for s in states if not s[name]["exit_codes"]]
        assert len(other) == 1 and other[0]["state"] == "skipped", other
        assert "running elsewhere" in other[0]["detail"] or other[0]["detail"] == "skip: completed"


def fake_status(run_dir, state, step, total=80, heartbeat_age=0.0, **metrics):
    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time() - heartbeat_age
    body = {"state": state, "step": step, "total": total, "metrics": metrics, "heartbeat": "2026-01-01T00:00:00+00:00",
            "heartbeat_unix": now, "host": "somehost", "pid": 123}
    (run_dir / "status.json").write_text(json.dumps(body))


def test_dry_run_list_and_each_decision(tmp_path, tiny_sudoku, compile_cache):
    cfg, out = tmp_path / "configs", tmp_path / "runs"
    for name in ("d_done", "d_pre", "d_ckpt", "d_new", "d_busy", "d_failed", "d_orphan"):
        write_config(cfg, name, tiny_sudoku, compile_cache)
    write_config(cfg, "d_nodata", str(tmp_path / "no-such-data"), compile_cache)
    write_config(cfg, "d_badkey", tiny_sudoku, compile_cache, extra="epoch: 3\n")
    write_config(cfg, "other", tiny_sudoku, compile_cache)
    fake_status(out / "tb" / "d_done", "completed", 80)
    fake_status(out / "tb" / "d_pre", "preempted", 7)
    (out / "tb" / "d_ckpt" / "checkpoints" / "12").mkdir(parents=True)
    (out / "tb" / "d_ckpt" / "checkpoints" / "16.orbax-checkpoint-tmp-1").mkdir()  # uncommitted: ignored
    fake_status(out / "tb" / "d_failed", "failed", 3)
    fake_status(out / "tb" / "d_orphan", "running", 5, heartbeat_age=5)  # a trainer without a lease
    (out / "tb" / "d_busy").mkdir(parents=True)
    (out / "tb" / "d_busy" / "lease.json").write_text(json.dumps({
        "owner": {"host": "otherhost", "pid": 9, "token": "t"}, "heartbeat_unix": time.time(), "expires_after_s": 600}))

    listed = script(BATCH, "--pattern", "d", "--list", config_dir=cfg, out=out)
    assert listed.returncode == 0 and listed.stdout.split() == sorted(
        ["d_badkey", "d_busy", "d_ckpt", "d_done", "d_failed", "d_new", "d_nodata", "d_orphan", "d_pre"])
    listed = script(BATCH, "--regex", "^d_(pre|ckpt)$", "other", "--list", config_dir=cfg, out=out)
    assert listed.stdout.split() == ["other", "d_ckpt", "d_pre"]
    assert script(BATCH, "--pattern", "d_[bc]*", "--list", config_dir=cfg, out=out).stdout.split() == [
        "d_badkey", "d_busy", "d_ckpt"]

    dry = script(BATCH, "--pattern", "d_*", "missing_one", "--dry-run", config_dir=cfg, out=out)
    assert dry.returncode == 1, dry.stdout + dry.stderr  # something is blocked
    plan = {line.split()[0]: line.split(None, 1)[1] for line in dry.stdout.splitlines()[1:] if line.strip()}
    assert plan["d_done"] == "skip: completed"
    assert plan["d_pre"] == "resume from step 7"
    assert plan["d_ckpt"] == "resume from step 12"
    assert plan["d_new"] == "run"
    assert plan["d_busy"].startswith("skip: running elsewhere (lease held by otherhost pid 9")
    assert plan["d_orphan"].startswith("skip: running elsewhere (somehost")
    assert plan["d_failed"].startswith("skip: failed at step 3")
    assert plan["d_nodata"].startswith("blocked: dataset") and "no-such-data" in plan["d_nodata"]
    assert plan["d_badkey"].startswith("blocked:") and "epoch" in plan["d_badkey"]
    assert plan["missing_one"].startswith("blocked: no config missing_one.yaml")
    assert not (out / "tb" / "d_new").exists() and not list(out.glob("*/d_new*"))  # nothing launched

    dry = script(BATCH, "d_done", "d_failed", "--dry-run", "--rerun", "--retry-failed", config_dir=cfg, out=out)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "d_done--rerun1  run" in dry.stdout and "d_failed        run" in dry.stdout
    fake_status(out / "tb" / "d_done--rerun1", "completed", 80)
    dry = script(BATCH, "d_done", "--dry-run", "--rerun", config_dir=cfg, out=out)
    assert "d_done--rerun2  run" in dry.stdout

    # A stale 'running' record (its process died) is resumed, not skipped.
    fake_status(out / "tb" / "d_orphan", "running", 5, heartbeat_age=3600)
    dry = script(BATCH, "d_orphan", "--dry-run", "--stale-after", "60", config_dir=cfg, out=out)
    assert "d_orphan  resume from step 5" in dry.stdout


@pytest.mark.fault(11, "hostile config names / patterns refused by the batch runner before anything runs")
@pytest.mark.parametrize("hostile", ["a;rm -rf x", "$(id)", "../x", "..", "a b", "x`id`"])
def test_hostile_names_are_refused(tmp_path, hostile):
    cfg, out = tmp_path / "configs", tmp_path / "runs"
    cfg.mkdir()
    for path, args in ((RUN, [hostile]), (BATCH, [hostile]), (BATCH, ["--pattern", hostile])):
        res = script(path, *args, config_dir=cfg, out=out)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "invalid" in res.stderr
    assert not (tmp_path / "x").exists() and not out.exists()
    with pytest.raises(runs.RunError):
        runs.resolve(hostile, [], config_dir=str(cfg))


def test_run_experiment_overrides_make_a_distinct_run_and_status_json(tmp_path, tiny_sudoku, compile_cache):
    cfg, out, logs = tmp_path / "configs", tmp_path / "runs", tmp_path / "logs"
    write_config(cfg, "e01_a", tiny_sudoku, compile_cache)
    canonical = out / "tb" / "e01_a"
    fake_status(canonical, "completed", 16, total=16)
    before = {p: p.stat().st_mtime_ns for p in canonical.rglob("*")}

    dry = script(RUN, "e01_a", "epochs=2", "--dry-run", config_dir=cfg, out=out)
    assert dry.returncode == 0, dry.stderr
    assert "epochs: 2" in dry.stdout and f"# run dir {out}/tb/e01_a--epochs=2" in dry.stdout
    assert "# plan: run" in dry.stdout

    res = script(RUN, "e01_a", "epochs=2", config_dir=cfg, out=out, logs=logs)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    variant = out / "tb" / "e01_a--epochs=2"
    assert json.loads((variant / "status.json").read_text())["state"] == "completed"
    assert {p: p.stat().st_mtime_ns for p in canonical.rglob("*")} == before  # untouched
    assert "eval step" in res.stdout  # the run's console is shown (and kept in the logs dir)
    again = script(RUN, "e01_a", "epochs=2", config_dir=cfg, out=out, logs=logs)
    assert again.returncode == 0 and "skip: completed" in again.stdout

    # kellen status --json: the canonical run, its variant, a stale and a live running run.
    write_config(cfg, "e01_b", tiny_sudoku, compile_cache)
    write_config(cfg, "e01_c", tiny_sudoku, compile_cache)
    fake_status(out / "tb" / "e01_b", "running", 20, total=80, heartbeat_age=7200, **{"train/lm_loss": 1.5})
    fake_status(out / "tb" / "e01_c", "running", 20, total=80, heartbeat_age=1,
                **{"train/lm_loss": 1.25, "perf/step_time": 0.5, "perf/examples_per_sec": 32.0,
                   "eval/all/exact_accuracy": 0.5})
    st = subprocess.run([sys.executable, STATUS, "e01", "--json", "--config-dir", str(cfg), "--output-root", str(out),
                         "--stale-after", "600"], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                        timeout=120)
    assert st.returncode == 0, st.stderr
    rows = {r["run"]: r for r in json.loads(st.stdout)}
    assert set(rows) == {"e01_a", "e01_a--epochs=2", "e01_b", "e01_c"}
    assert rows["e01_a--epochs=2"]["state"] == "completed" and rows["e01_a--epochs=2"]["step"] == 8
    assert rows["e01_a--epochs=2"]["eval_exact_accuracy"] is not None
    assert rows["e01_b"]["state"] == "stale" and rows["e01_b"]["heartbeat_age_s"] >= 7000
    c = rows["e01_c"]
    assert (c["state"], c["lm_loss"], c["eval_exact_accuracy"], c["examples_per_sec"]) == ("running", 1.25, 0.5, 32.0)
    assert c["eta_s"] == pytest.approx(30.0) and c["host"] == "somehost"
    table = subprocess.run([sys.executable, STATUS, "e01", "--config-dir", str(cfg), "--output-root", str(out)],
                           cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "e01_a--epochs=2" in table.stdout and "ETA" in table.stdout


def test_gcs_run_dirs_plan_lease_and_status(tmp_path, gcs_prefix, tiny_sudoku, compile_cache):
    """Decisions and `kellen status` read gs:// records the same way (in-process, no training)."""
    import argparse

    from kellen import gcs
    from kellen.experiments import batch, status_cli
    from kellen.experiments.lease import Lease

    cfg, root = tmp_path / "configs", gcs_prefix + "runs"
    for name in ("g_done", "g_pre", "g_ckpt", "g_new"):
        write_config(cfg, name, tiny_sudoku, compile_cache)
    write_config(cfg, "g_nodata", gcs_prefix + "data/missing", compile_cache)
    body = {"step": 16, "total": 16, "metrics": {}, "heartbeat_unix": time.time(), "host": "h", "pid": 1}
    gcs.write_text(f"{root}/tb/g_done/status.json", json.dumps(dict(body, state="completed")))
    gcs.write_text(f"{root}/tb/g_pre/status.json", json.dumps(dict(body, state="preempted", step=7)))
    gcs.write_text(f"{root}/tb/g_ckpt/checkpoints/12/meta/metadata", "{}")
    names = ["g_done", "g_pre", "g_ckpt", "g_new", "g_nodata"]
    plans = batch.plan_all(names, [], config_dir=str(cfg), output_root=root)
    assert [p.describe() for p in plans][:4] == ["skip: completed", "resume from step 7", "resume from step 12", "run"]
    assert plans[4].describe().startswith(f"blocked: dataset {gcs_prefix}data/missing not found")
    assert plans[3].target.run_dir == f"{root}/tb/g_new"
    with Lease(plans[3].target.run_dir):
        (busy,) = batch.plan_all(["g_new"], [], config_dir=str(cfg), output_root=root)
        assert busy.describe().startswith("skip: running elsewhere (lease held by")
    args = argparse.Namespace(pattern="g", config_dir=str(cfg), output_root=root, stale_after=900.0)
    rows = {r["run"]: r for r in status_cli.collect(args)}
    assert rows["g_done"]["state"] == "completed" and rows["g_pre"]["state"] == "preempted"
    assert rows["g_new"]["state"] == "not_started" and rows["g_pre"]["step"] == 7
