"""pretrain_jax.py as a researcher runs it: Hydra composition, errors, the run record, multirun, gs://."""
import json
import os

import pytest

from pretrain_helpers import clean_env, metrics, pretrain


def test_cfg_job_and_info_work_and_presets_compose(tmp_path):
    r = pretrain("--cfg", "job", "+experiment=quick_test", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "hidden_size: 32" in r.stdout and "kind: sudoku" in r.stdout and "global_batch_size:" in r.stdout
    r = pretrain("--cfg", "job", "+experiment=full_training", "epochs=10000", cwd=tmp_path)
    assert r.returncode == 0 and "epochs: 10000" in r.stdout and "mlp_t: true" in r.stdout
    for preset in ("low_memory", "large_batch"):
        assert pretrain("--cfg", "job", f"+experiment={preset}", cwd=tmp_path).returncode == 0
    r = pretrain("--info", cwd=tmp_path)
    assert r.returncode == 0 and "Config search path" in r.stdout
    assert os.listdir(tmp_path) == []  # no outputs/, no .hydra, no chdir side effects


@pytest.mark.parametrize("args,named", [
    (["epoch=5"], "epoch"),
    (["+epoch=5"], "epoch"),
    (["epochs=lots"], "epochs"),
    (["arch.hidden_sise=8"], "hidden_sise"),
    (["arch.mlp_t=maybe"], "mlp_t"),
    (["--config-name", "bad_key"], "epoch"),
])
def test_unknown_keys_and_wrong_types_fail_at_compose_time(tmp_path, args, named):
    r = pretrain(*args, cwd=tmp_path)
    assert r.returncode != 0
    assert named in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert os.listdir(tmp_path) == []


def test_config_errors_are_one_line_before_any_training(tmp_path, tiny_sudoku):
    r = pretrain("+experiment=tiny", f"data_paths=[{tiny_sudoku}]", "eval_interval=3", f"output_root={tmp_path}")
    assert r.returncode == 2
    assert r.stderr.strip() == "pretrain_jax.py: error: eval_interval=3 must divide epochs=4"
    r = pretrain("+experiment=tiny", f"data_paths=[{tmp_path / 'nope'}]", f"output_root={tmp_path}")
    assert r.returncode == 2 and "nope/train/dataset.json: missing file" in r.stderr
    r = pretrain("+experiment=tiny", f"data_paths=[{tiny_sudoku}]", "mesh.axes.data=3", f"output_root={tmp_path}")
    assert r.returncode == 2 and "mesh.axes: shape (3, 1) needs 3 devices, but there are 1" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_dataset_that_does_not_fit_the_model_is_refused(tmp_path, tiny_sudoku, kellen_cmd):
    import subprocess
    maze = tmp_path / "maze"
    subprocess.run(kellen_cmd + ["data", "maze", "--out", str(maze), "--generate", "4", "--size", "10"], check=True,
                   capture_output=True)
    r = pretrain("+experiment=tiny", f"data_paths=[{tiny_sudoku}]", f"data_paths_test=[{maze}]",
                 f"output_root={tmp_path}")
    assert r.returncode == 2
    assert r.stderr.strip() == (f"pretrain_jax.py: error: {maze}/test/dataset.json: key 'seq_len'=100 "
                                "does not fit arch.seq_len=81")


def test_run_record_and_multirun(tmp_path, tiny_sudoku, compile_cache):
    r = pretrain("--multirun", "seed=0,1", "+experiment=tiny", f"data_paths=[{tiny_sudoku}]", "max_steps=3",
                 f"output_root={tmp_path / 'runs'}", f"compilation_cache_dir={compile_cache}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted(os.listdir(tmp_path / "runs" / "adhoc"))
    assert len(runs) == 2 and all(n.startswith("tiny--seed=") for n in runs), runs
    run = tmp_path / "runs" / "adhoc" / runs[0]
    # W&B is disabled in the tests' environment, so no wandb/ (tests/test_run_outputs.py covers it).
    assert sorted(os.listdir(run)) == ["checkpoints", "config.yaml", "logs", "metadata.json", "metrics.csv",
                                       "overrides.yaml", "plots", "reproduce.sh", "requirements.txt", "status.json",
                                       "summary.json", "wandb.json"]
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert "max_steps: 3" in (run / "config.yaml").read_text()
    assert "seed=0" in (run / "overrides.yaml").read_text()
    meta = json.loads((run / "metadata.json").read_text())
    for key in ("git", "command", "hostnames", "versions", "backend", "device_kind", "device_count", "mesh",
                "process_count", "start_time"):
        assert key in meta, key
    assert meta["git"]["commit"] and meta["versions"]["jax"] and meta["versions"]["optax"]
    assert meta["backend"] == "cpu" and meta["process_count"] == 1 and meta["mesh"] == {"data": 1, "fsdp": 1}
    assert "jax==" in (run / "requirements.txt").read_text()
    rows = metrics(run)
    assert [r["step"] for r in rows if "train/lm_loss" in r] == [1, 2, 3]
    assert any("eval/all/exact_accuracy" in r for r in rows)
    assert sorted(os.listdir(tmp_path)) == ["runs"]  # nothing else written in the working directory


def test_gcs_output_root_gets_the_run_record(tmp_path, tiny_sudoku, compile_cache, gcs_prefix):
    from kellen import gcs
    root = gcs_prefix + "runs"
    r = pretrain("+experiment=tiny", f"data_paths=[{tiny_sudoku}]", "max_steps=2", f"output_root={root}",
                 f"compilation_cache_dir={compile_cache}", "run_name=on-gcs", env=clean_env())
    assert r.returncode == 0, r.stderr[-3000:]
    files = gcs.list_files(f"{root}/adhoc/on-gcs")
    assert {"config.yaml", "overrides.yaml", "metadata.json", "requirements.txt", "logs/metrics.jsonl"} <= set(files)
    lines = gcs.read_text(f"{root}/adhoc/on-gcs/logs/metrics.jsonl").splitlines()
    assert any('"eval/all/accuracy"' in line for line in lines)


def test_relative_output_root_checkpoints(tmp_path, tiny_sudoku, compile_cache):
    # `output_root=runs` (the default) is relative to where the command runs; Orbax needs absolute paths.
    r = pretrain("+experiment=tiny", f"data_paths=[{tiny_sudoku}]", "max_steps=8", "output_root=runs",
                 "run_name=rel", f"compilation_cache_dir={compile_cache}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "adhoc" / "rel"
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert (run / "checkpoints" / "8" / "state").is_dir()
