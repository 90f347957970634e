"""The run record and W&B, end to end through pretrain_jax.py: every file of the local record,
an offline W&B run read back (group, name, id, config, history), the same W&B run continued after
a preemption, a NaN loss failing the run with FAILED.txt, a W&B failure not stopping training,
and no secret in any written file."""
import pytest
import csv
import json
import signal

import numpy as np
from matplotlib import image

from kellen.train.redact import find_secrets
from pretrain_helpers import clean_env, metrics, pretrain
from test_resume import run_args, wait_for_steps
from wandb_reader import read_offline_segments

SECRETS = {"WANDB_API_KEY": "wandbkey0123456789abcdef0123456789abcdef",
           "HF_TOKEN": "hf_tokenValue987654321"}
URL_TOKEN = "urlTok3nSecret42"
PRIVATE_KEY = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7fakekeymaterial"


def wandb_env(tmp_path, mode="offline", **extra):
    env = {"WANDB_MODE": mode, "WANDB_CONFIG_DIR": str(tmp_path / "wb-config"),
           "WANDB_CACHE_DIR": str(tmp_path / "wb-cache"), "WANDB_DATA_DIR": str(tmp_path / "wb-data")}
    env.update(extra)
    return clean_env(env)


@pytest.mark.fault(10, "no secret in any file of a run dir, its W&B log included")
def test_offline_run_writes_the_whole_record_and_no_secret(tmp_path, tiny_sudoku, compile_cache):
    creds = tmp_path / "sa.json"
    creds.write_text(json.dumps({"type": "service_account", "private_key_id": "0f1e2d3c4b5a69788796a5b4",
                                 "private_key": f"-----BEGIN PRIVATE KEY-----\n{PRIVATE_KEY}\n-----END PRIVATE KEY-----\n",
                                 "client_email": "trainer@proj-secret.iam.gserviceaccount.com"}))
    env = wandb_env(tmp_path, **SECRETS, GOOGLE_APPLICATION_CREDENTIALS=str(creds))
    notes = f"wandb.notes='https://someone:{URL_TOKEN}@example.com/d?token={URL_TOKEN}x'"
    proc = pretrain(*run_args(tiny_sudoku, tmp_path, compile_cache, "rec", notes, "wandb.tags=[scale]"), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "adhoc" / "rec"
    for name in ("config.yaml", "overrides.yaml", "metadata.json", "requirements.txt", "reproduce.sh",
                 "logs/metrics.jsonl", "logs/train.log", "metrics.csv", "summary.json", "status.json", "wandb.json"):
        assert (run / name).is_file(), name

    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == status["total"] == 16
    assert status["host"] and status["heartbeat"] and "train/lm_loss" in status["metrics"]

    rows = metrics(run)
    train = [r for r in rows if "train/lm_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 17))
    for key in ("train/lm_loss", "train/q_halt_loss", "train/accuracy", "train/exact_accuracy",
                "train/q_halt_accuracy", "train/steps", "train/lr", "train/grad_norm", "train/param_norm",
                "perf/step_time", "perf/examples_per_sec", "perf/tokens_per_sec", "perf/model_tflops_per_device"):
        assert all(np.isfinite(r[key]) for r in train), key
    assert all(r["train/grad_norm"] > 0 and r["train/param_norm"] > 0 for r in train)
    assert all(abs(r["perf/examples_per_sec"] * r["perf/step_time"] - 16) < 1e-6 for r in train)
    num_params = next(r["num_params"] for r in rows if "num_params" in r)
    assert next(r["perf/compile_time"] for r in rows if "perf/compile_time" in r) > 0
    evals = [r for r in rows if "eval/all/exact_accuracy" in r]
    assert [r["step"] for r in evals] == [8, 16]
    elapsed = [r["elapsed"] for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0

    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_params"] == num_params > 1000
    assert summary["final_eval"]["step"] == 16
    assert summary["final_eval"]["eval/all/exact_accuracy"] == evals[-1]["eval/all/exact_accuracy"]
    assert summary["best_eval"]["eval/all/exact_accuracy"] == max(r["eval/all/exact_accuracy"] for r in evals)
    assert summary["mean_examples_per_sec"] > 0 and summary["wall_clock_seconds"] == max(elapsed)
    assert set(summary["reach"]) == {"0.80", "0.85"}  # this tiny run reaches neither
    assert summary["reach"]["0.80"] is None

    with open(run / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["train/lm_loss"]) for r in table if r["train/lm_loss"]] == [r["train/lm_loss"] for r in train]
    for png in ("loss_vs_step", "loss_vs_time", "eval_accuracy", "lr"):
        img = image.imread(run / "plots" / f"{png}.png")
        assert img.shape[0] > 100 and img.std() > 0, png

    script = (run / "reproduce.sh").read_text()
    assert "git checkout " in script and "pip install -e ." in script
    assert "pretrain_jax.py --config-dir" in script and "run_name=rec" in script and "+experiment=tiny" in script
    assert "wandb.tags=[scale]" in script
    assert "example.com" in script and URL_TOKEN not in script  # the URL stays, its credentials go
    log = (run / "logs" / "train.log").read_text()
    assert "eval step 16" in log and "step 16/16" in log

    # W&B, read back from its offline log.
    ident = json.loads((run / "wandb.json").read_text())
    wb = read_offline_segments(str(run / "wandb"), ident["id"])
    assert (wb["project"], wb["group"], wb["name"], wb["id"]) == ("TRM-Scaling-Research", "adhoc", "rec", ident["id"])
    assert set(wb["tags"]) == {"adhoc", "scale"} and wb["job_type"] == "train"
    assert wb["config"]["global_batch_size"] == 16 and wb["config"]["arch"]["hidden_size"] == 32
    hist = [h for h in wb["history"] if "train/lm_loss" in h]
    assert [h["_step"] for h in hist] == list(range(1, 17))
    assert [h["train/lm_loss"] for h in hist] == [r["train/lm_loss"] for r in train]
    assert [h["eval/all/exact_accuracy"] for h in wb["history"] if "eval/all/exact_accuracy" in h] == \
        [r["eval/all/exact_accuracy"] for r in evals]

    secrets = list(SECRETS.values()) + [URL_TOKEN, PRIVATE_KEY, str(creds), "proj-secret.iam"]
    assert find_secrets(str(run), secrets) is None, find_secrets(str(run), secrets)


def test_preempted_run_continues_the_same_wandb_run(tmp_path, tiny_sudoku, compile_cache):
    env = wandb_env(tmp_path)
    run = tmp_path / "adhoc" / "pre"
    proc = pretrain(*run_args(tiny_sudoku, tmp_path, compile_cache, "pre"), popen=True, env=env)
    try:
        wait_for_steps(run, 11, proc)  # after the step-8 eval, so the resume re-logs steps 9..
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75
    first = json.loads((run / "wandb.json").read_text())["id"]
    stopped = json.loads((run / "status.json").read_text())
    assert stopped["state"] == "preempted"
    before = max(r["elapsed"] for r in metrics(run))

    again = pretrain(*run_args(tiny_sudoku, tmp_path, compile_cache, "pre"), env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run / "wandb.json").read_text())["id"] == first
    ckpt_meta = json.loads((run / "checkpoints" / "16" / "meta" / "metadata").read_text())
    assert ckpt_meta["wandb_run_id"] == first
    wb = read_offline_segments(str(run / "wandb"), first)
    assert wb["id"] == first and len(wb["segments"]) == 2
    steps = [h["_step"] for h in wb["history"] if "train/lm_loss" in h]
    assert steps == list(range(1, 17))  # continuing, no step twice
    assert min(r["elapsed"] for r in metrics(run)[-5:]) > before  # wall-clock continues too
    assert json.loads((run / "summary.json").read_text())["steps"] == 16


@pytest.mark.fault(5, "a diverging loss (lr=1e30) stops the run: failed, step, FAILED.txt")
def test_nan_loss_stops_the_run_with_failed_txt(tmp_path, tiny_sudoku, compile_cache):
    proc = pretrain(*run_args(tiny_sudoku, tmp_path, compile_cache, "nan", "lr=1e30", "lr_warmup_steps=0"))
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if "pretrain_jax.py" in ln]
    assert len(lines) == 1 and "non-finite training loss at step" in lines[0] and "FAILED.txt" in lines[0]
    run = tmp_path / "adhoc" / "nan"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and status["step"] < 16
    failed = (run / "FAILED.txt").read_text()
    assert f"run failed at step {status['step']}: NonFiniteLoss" in failed
    assert "Traceback" in failed and '"train/lm_loss": NaN' in failed
    assert not any(r.get("step", 0) > status["step"] for r in metrics(run))  # it did not train on


def test_wandb_failure_keeps_training_and_the_local_record(tmp_path, tiny_sudoku, compile_cache):
    env = wandb_env(tmp_path, mode="online", WANDB_API_KEY="f" * 40, WANDB_BASE_URL="http://127.0.0.1:9")
    proc = pretrain(*run_args(tiny_sudoku, tmp_path, compile_cache, "nowb", "wandb.init_timeout=2"), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "adhoc" / "nowb"
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert "warning" in (run / "logs" / "train.log").read_text().lower()
    assert [r["step"] for r in metrics(run) if "train/lm_loss" in r] == list(range(1, 17))
    assert json.loads((run / "summary.json").read_text())["final_eval"]["step"] == 16
