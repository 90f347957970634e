"""`python pretrain_jax.py +experiment=quick_test` (what `make demo` runs): on a fresh checkout it
builds its generated easy-Sudoku data, trains for a few CPU minutes, and the test-set exact
accuracy rises clearly.

Observed on 2 shared CPU cores (2026-11-24): exact accuracy 0.000 before training, 0.977-0.996
after (three seeds of the same recipe), token accuracy 0.096 -> 0.9997; about 2.5 minutes in
all. The thresholds sit well below that, so that scheduling or BLAS differences cannot flip the
test, while a model that only copies the clues (exact 0) still fails it.
"""
import json
import pathlib

from pretrain_helpers import metrics, pretrain


def test_quick_test_builds_its_data_and_learns_easy_sudoku(tmp_path):
    data = tmp_path / "data" / "quick-sudoku"
    r = pretrain("+experiment=quick_test", f"data_paths=[{data}]", f"output_root={tmp_path / 'runs'}",
                 "run_name=quick", "compilation_cache_dir=null", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    built = json.loads((data / "build.json").read_text())
    assert built["generate"] == 2000 and built["min_clues"] == 75
    assert json.loads((data / "test" / "dataset.json").read_text())["total_groups"] == 256
    rows = metrics(tmp_path / "runs" / "adhoc" / "quick")
    evals = [r for r in rows if "eval/all/exact_accuracy" in r]
    assert [e["step"] for e in evals] == [0, 406]
    before, after = evals[0], evals[-1]
    print(f"exact accuracy {before['eval/all/exact_accuracy']:.3f} -> {after['eval/all/exact_accuracy']:.3f}, "
          f"token accuracy {before['eval/all/accuracy']:.3f} -> {after['eval/all/accuracy']:.3f}")
    assert before["eval/all/exact_accuracy"] <= 0.05 and before["eval/all/accuracy"] <= 0.3
    assert after["eval/all/exact_accuracy"] >= 0.7 and after["eval/all/accuracy"] >= 0.95
    assert after["eval/all/count"] == 256  # the whole test set, no padding counted
    train = [r for r in rows if "train/lm_loss" in r]
    assert len(train) == 406 and train[-1]["train/lm_loss"] < 0.1 * train[0]["train/lm_loss"]
    assert (pathlib.Path(tmp_path) / "runs" / "adhoc" / "quick" / "config.yaml").exists()
