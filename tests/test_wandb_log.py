"""kellen.train.wandb_log against real W&B offline runs, read back from the .wandb log."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import wandb_reader  # tests/wandb_reader.py
from kellen.train.wandb_log import WandbRun, new_run_id, resolve_mode

CONFIG = {"lr": 1e-4, "epochs": 3, "arch": {"H_cycles": 3, "name": "trm"}, "flag": True, "tags_in_cfg": ["a"]}


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """Everything W&B writes goes under tmp_path; no key, so nothing can go online."""
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_RUN_ID",
                "WANDB_RESUME", "WANDB_RUN_GROUP", "WANDB_TAGS", "WANDB_NOTES", "WANDB_INIT_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var, sub in (("WANDB_DIR", "wdir"), ("WANDB_CONFIG_DIR", "wconfig"),
                     ("WANDB_CACHE_DIR", "wcache"), ("WANDB_DATA_DIR", "wdata")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    return tmp_path


def make_run(directory, run_id, mode="offline", config=CONFIG, **kw):
    return WandbRun(project="kellen-test", group="exp99", name="exp99_a--lr=1e-4", run_id=run_id,
                    tags=["exp99", "test"], job_type="train", config=config, directory=str(directory),
                    mode=mode, **kw)


# ---- resolve_mode -------------------------------------------------------------------------------

def test_resolve_mode(tmp_path):
    none = {"NETRC": str(tmp_path / "missing")}
    assert resolve_mode("offline", {"WANDB_MODE": "online", "WANDB_API_KEY": "k"}) == "offline"
    assert resolve_mode("disabled", {"WANDB_MODE": "online"}) == "disabled"
    assert resolve_mode(None, {**none, "WANDB_MODE": "dryrun"}) == "offline"
    assert resolve_mode(None, {**none, "WANDB_MODE": "run"}) == "online"
    assert resolve_mode(None, {**none, "WANDB_MODE": "disabled", "WANDB_API_KEY": "k"}) == "disabled"
    assert resolve_mode(None, {**none, "WANDB_API_KEY": "k"}) == "online"
    assert resolve_mode(None, {**none, "WANDB_API_KEY": "  "}) == "offline"
    assert resolve_mode(None, none) == "offline"
    assert resolve_mode("", none) == "offline"

    rc = tmp_path / "netrc"
    rc.write_text("machine api.wandb.ai\n  login user\n  password abcdef0123\n")
    assert resolve_mode(None, {"NETRC": str(rc)}) == "online"
    rc.write_text("machine example.com\n  login user\n  password abcdef0123\n")
    assert resolve_mode(None, {"NETRC": str(rc)}) == "offline"
    rc.write_text("machine api.wandb.ai login\n")  # broken file: tolerated
    assert resolve_mode(None, {"NETRC": str(rc)}) == "offline"

    with pytest.raises(ValueError, match=r"wandb\.mode.*online, offline, disabled"):
        resolve_mode("dryrun", none)


def test_new_run_id():
    ids = {new_run_id() for _ in range(50)}
    assert len(ids) == 50 and all(re.fullmatch(r"[a-z0-9]{8}", i) for i in ids)


# ---- offline runs -------------------------------------------------------------------------------

def test_offline_run_roundtrip(wandb_env):
    d = wandb_env / "run"
    run = make_run(d, "round001")
    assert not run.active and run.run_id == "round001"
    assert run.start() and run.active
    for step in (1, 2, 3):
        run.log({"train/loss": 1.0 / step, "train/lr": np.float32(0.5), "train/count": np.int64(step),
                 "eval/all/exact_accuracy": 0.25 * step, "train/ok": True, "train/zero_d": np.array(7.0),
                 "nested": {"skip": 1}, "text": "skipped", "vector": np.ones(3)}, step=step)
    run.summary_update({"best/eval/all/exact_accuracy": 0.75, "best_step": 3})
    run.finish()
    run.finish()  # idempotent
    assert not run.active
    run.log({"train/loss": 0.0}, step=4)  # after finish: a no-op

    segs = wandb_reader.list_offline_runs(str(d))
    assert len(segs) == 1 and os.path.basename(segs[0]).startswith("offline-run-")
    assert os.path.dirname(segs[0]) == str(d / "wandb")
    got = wandb_reader.read_offline_run(segs[0])
    assert (got["project"], got["group"], got["name"], got["id"], got["tags"], got["job_type"]) == \
        ("kellen-test", "exp99", "exp99_a--lr=1e-4", "round001", ["exp99", "test"], "train")
    assert got["config"] == CONFIG
    assert [h["_step"] for h in got["history"]] == [1, 2, 3]
    for step, h in zip((1, 2, 3), got["history"]):
        assert h["train/loss"] == pytest.approx(1.0 / step)
        assert h["eval/all/exact_accuracy"] == pytest.approx(0.25 * step)
        assert (h["train/lr"], h["train/count"], h["train/ok"], h["train/zero_d"]) == (0.5, step, True, 7.0)
        assert not {"nested", "text", "vector"} & set(h)
    assert got["summary"]["best/eval/all/exact_accuracy"] == 0.75 and got["summary"]["best_step"] == 3
    assert got["exit_code"] == 0

    # Cross-check the log parser against W&B's own reader.
    exe = shutil.which("wandb", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("no wandb CLI next to the interpreter")
    out = subprocess.run([exe, "leet", "inspect", "--json", segs[0]], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["history"]["item"] for r in records if r["type"] == "history"] == got["history"]
    (rr,) = [r["run"] for r in records if r["type"] == "run"]
    assert (rr["project"], rr["run_group"], rr["display_name"], rr["run_id"], rr["tags"], rr["job_type"]) == \
        (got["project"], got["group"], got["name"], got["id"], got["tags"], got["job_type"])
    assert {k: v for k, v in rr["config"]["update"].items() if k != "_wandb"} == got["config"]


def test_offline_resume_continues_without_duplicates(wandb_env):
    d = wandb_env / "run"
    big = {**CONFIG, "blob": "x" * 80_000}  # a run record spanning blocks: FIRST/MIDDLE/LAST framing
    first = make_run(d, "resume01", config=big)
    assert first.start()
    for step in (1, 2, 3):
        first.log({"train/loss": float(step)}, step=step)
    first.finish()

    second = make_run(d, "resume01", config=big)
    assert second.start()
    second.log({"train/loss": 20.0}, step=2)   # the loop re-logs after restoring an older checkpoint
    second.log({"train/loss": 30.0}, step=3)
    second.log({"train/loss": 4.0}, step=4)
    second.log({"train/loss": 5.0}, step=5)
    second.log({"eval/all/exact_accuracy": 0.5}, step=5)  # same step: merged into one row
    second.log({"train/loss": 40.0}, step=4)  # going back within a session: dropped
    second.finish()

    segs = wandb_reader.list_offline_runs(str(d))
    assert len(segs) == 2  # offline resume writes a second offline-run-* dir with the same id
    merged = wandb_reader.read_offline_segments(str(d), "resume01")
    assert merged["segments"] == segs and merged["id"] == "resume01"
    assert all(wandb_reader.read_offline_run(s)["id"] == "resume01" for s in segs)
    assert merged["config"]["blob"] == big["blob"]
    assert [h["_step"] for h in merged["history"]] == [1, 2, 3, 4, 5]
    assert [h["train/loss"] for h in merged["history"]] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert merged["history"][-1]["eval/all/exact_accuracy"] == 0.5


def test_init_failure_warns_and_disables(wandb_env, monkeypatch):
    # A real failure: online, nothing listening at the server address, a fake key.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_API_KEY", "f" * 40)
    run = make_run(wandb_env / "run", new_run_id(), mode="online", init_timeout=1)
    with pytest.warns(RuntimeWarning, match="training continues"):
        assert run.start() is False
    assert not run.active
    run.log({"train/loss": 1.0}, step=1)
    run.summary_update({"a": 1})
    run.finish()
    run.finish(exit_code=1)


def test_init_exception_of_any_kind(wandb_env, monkeypatch):
    import wandb

    def boom(**kw):
        raise RuntimeError("quota exceeded\nsecond line")
    monkeypatch.setattr(wandb, "init", boom)
    run = make_run(wandb_env / "run", "boom0001")
    with pytest.warns(RuntimeWarning, match=r"RuntimeError: quota exceeded\);") as rec:
        assert run.start() is False
    assert "\n" not in str(rec[0].message)
    run.log({"x": 1.0}, step=1)
    run.finish()


def test_log_failure_warns_once(wandb_env):
    run = make_run(wandb_env / "run", "logfail1")
    assert run.start()
    real = run._run

    class Broken:
        def log(self, *a, **k):
            raise OSError("disk full")
    run._run = Broken()
    with pytest.warns(RuntimeWarning, match="log failed"):
        run.log({"x": 1.0}, step=1)
    assert not run.active
    run.log({"x": 2.0}, step=2)  # no second warning, no exception
    real.finish()


def test_api_key_not_written(wandb_env, monkeypatch):
    secret = "kellen-unique-secret-" + new_run_id() * 3
    monkeypatch.setenv("WANDB_API_KEY", secret)
    d = wandb_env / "run"
    run = make_run(d, "secret01", mode=resolve_mode("offline"))
    assert run.start()
    run.log({"train/loss": 1.0}, step=1)
    run.finish()
    files = [os.path.join(r, f) for r, _, fs in os.walk(wandb_env) for f in fs]
    assert any(f.endswith(".wandb") for f in files)
    leaks = [f for f in files if os.path.isfile(f) and secret.encode() in open(f, "rb").read()]
    assert leaks == []


def test_disabled_writes_nothing(wandb_env):
    d = wandb_env / "run"
    run = make_run(d, "disab001", mode=resolve_mode(None, {"WANDB_MODE": "disabled"}))
    assert run.start() is False and not run.active
    run.log({"train/loss": 1.0}, step=1)
    run.summary_update({"a": 1})
    run.finish()
    assert not d.exists()
