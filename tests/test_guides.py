"""Experiment guides (kellen/experiments/guide.py) and run/group status (status.py).

Specs are built with the dataclass constructors, so these tests do not depend on the YAML loader."""
import argparse
import datetime
import json
import os
import time

import jinja2
import pytest

from kellen.experiments import guide, status
from kellen.experiments.spec import Criterion, GroupSpec, RunSpec

NOW = datetime.datetime(2026, 11, 2, 9, 30, tzinfo=datetime.timezone.utc)
BASELINE_CRIT = "eval/all/exact_accuracy >= 0.85 for baseline"
HEADINGS = ["## Overview", "## Configuration", "### Common settings", "## How to run", "## Expected results",
            "## Training time", "## Analysis", "## Results storage", "## Troubleshooting", "## Validation",
            "## Related experiments", "## References", "## Status"]


def make_group(output_root=None) -> GroupSpec:
    return GroupSpec(
        id="exp03", path="configs/experiments/exp03.yaml", sha256="0" * 64, name="Layers vs recursion",
        question="Depth or recursion?", hypothesis="Recursion is as good as depth.",
        expected_outcome="Equal accuracy at equal compute.", researcher="kellen", date="2026-11-01",
        tags=["depth"], wandb_project="TRM-Scaling-Research", storage_root="gs://bucket", output_root=output_root,
        fixed={"arch": {"mlp_t": True}, "global_batch_size": 768},
        variables=["arch.L_layers", "arch.L_cycles"],
        runs=[RunSpec("exp03_a", {"arch.L_layers": 1, "arch.L_cycles": 12}, {}, notes="shallow"),
              RunSpec("exp03_b", {"arch.L_layers": 2, "arch.L_cycles": 6}, {}, notes="the paper's setting",
                      baseline=True),
              RunSpec("exp03_c", {"arch.L_layers": 3, "arch.L_cycles": 4}, {})],
        metrics=["eval/all/exact_accuracy", "train/lm_loss"],
        success_criteria=[
            Criterion(BASELINE_CRIT, "eval/all/exact_accuracy", ">=", 0.85, "baseline"),
            Criterion("eval/all/exact_accuracy >= 0.5 for all", "eval/all/exact_accuracy", ">=", 0.5, "all"),
            Criterion("eval/all/exact_accuracy > 0.95 for any", "eval/all/exact_accuracy", ">", 0.95, "any"),
            Criterion("eval/all/exact_accuracy >= 0.7 for exp03_c", "eval/all/exact_accuracy", ">=", 0.7, "exp03_c"),
        ],
        analysis=["Does depth beat recursion at equal compute?"],
        runtime_estimate={"per_run_hours": 12, "hardware": "v4-64"},
        related=["exp01", "exp02a"], references=["Jolicoeur-Martineau 2025, Less is More"])


def write_run(root, run, state=None, acc=None, heartbeat=None, step=100, total=1000):
    d = root / "exp03" / run
    d.mkdir(parents=True, exist_ok=True)
    if state is not None:
        hb = time.time() if heartbeat is None else heartbeat
        (d / "status.json").write_text(json.dumps({
            "state": state, "step": step, "total": total, "metrics": {}, "heartbeat": "2026-11-02T09:00:00+00:00",
            "heartbeat_unix": hb, "host": "t1v-0", "pid": 1}))
    if acc is not None:
        (d / "summary.json").write_text(json.dumps({
            "primary_set": "all", "final_eval": {"step": step, "eval/all/exact_accuracy": acc},
            "best_eval": {"step": step, "eval/all/exact_accuracy": acc}, "reach": {"0.80": None, "0.85": None},
            "wall_clock_seconds": 7200.0, "num_params": 7000000, "steps": step}))
    return d


def test_render_without_status_has_every_section():
    text = guide.render_guide(make_group(), now=NOW)
    for h in HEADINGS:
        assert f"\n{h}\n" in text, h
    # configs table: variable values, baseline marker, notes
    assert "| Run | `arch.L_layers` | `arch.L_cycles` | Baseline | Notes |" in text
    assert "| `exp03_a` | 1 | 12 |  | shallow |" in text
    assert "| `exp03_b` | 2 | 6 | ⭐ baseline | the paper's setting |" in text
    assert "| `exp03_c` | 3 | 4 |  |  |" in text
    assert "- `arch.mlp_t`: `true`" in text and "- `global_batch_size`: `768`" in text
    for run in ("exp03_a", "exp03_b", "exp03_c"):
        assert f"gs://bucket/checkpoints/exp03/{run}/" in text
    assert "gsutil -m cp -r gs://bucket/checkpoints/exp03 ./results/checkpoints/" in text
    assert "gcloud storage cp -r gs://bucket/checkpoints/exp03 ./results/checkpoints/" in text
    assert "kellen results download exp03 --with-checkpoints" in text
    assert "kellen results download exp03" in text
    assert "python kellen/experiments/run_experiment_batch.py --pattern exp03" in text
    assert "python kellen/experiments/run_experiment.py exp03_b epochs=10000" in text
    assert "python pretrain_jax.py --config-name exp03_b epochs=10000" in text
    assert "tmux new -s exp03 'python kellen/experiments/run_experiment_batch.py --pattern exp03'" in text
    assert "kellen generate exp03" in text
    assert "max_steps=20" in text and "wandb.mode=disabled" in text
    assert "**Total: 36 h** (12 h × 3 runs)" in text
    assert "W&B: project `TRM-Scaling-Research`, group `exp03`, tags `exp03`, `depth`." in text
    assert "[exp01](exp01.md)" in text and "[exp02a](exp02a.md)" in text
    assert "exit code 75" in text and "FAILED.txt" in text and "low_memory" in text
    assert f"- [ ] {BASELINE_CRIT}\n" in text
    assert "**⏸️ Not Started**" in text
    assert "Last updated: 2026-11-02 09:30 UTC" in text
    assert "{{" not in text and "{%" not in text


def test_runtime_unknown_and_minimal_spec():
    g = GroupSpec(id="exp09", path="x.yaml", sha256="", runs=[RunSpec("exp09_a", {}, {})])
    text = guide.render_guide(g, now=NOW)
    assert "**Total: unknown**" in text
    assert "`runs/exp09/exp09_a/checkpoints/`" in text  # no storage root: checkpoints under the run dir
    assert "gsutil" not in text and "kellen results download exp09" in text


def test_group_running_then_complete_and_criteria(tmp_path):
    g = make_group(output_root=str(tmp_path))
    write_run(tmp_path, "exp03_a", "completed", acc=0.6)
    write_run(tmp_path, "exp03_b", "running", acc=0.7)  # a fresh heartbeat; its summary is not final
    write_run(tmp_path, "exp03_c", "failed", acc=0.1)
    st = status.group_status(g)
    assert st["state"] == "Running"
    assert [s["state"] for s in st["runs"].values()] == ["completed", "running", "failed"]
    assert status.check_criteria(g, st)[0] == (BASELINE_CRIT, None)  # baseline not finished
    assert "**▶️ Running**" in guide.render_guide(g, st, now=NOW)

    write_run(tmp_path, "exp03_a", "completed", acc=0.6, step=1000)
    write_run(tmp_path, "exp03_b", "completed", acc=0.9, step=1000)
    write_run(tmp_path, "exp03_c", "completed", acc=0.75, step=1000)
    st = status.group_status(g)
    assert st["state"] == "Complete"
    assert status.check_criteria(g, st) == [(BASELINE_CRIT, True), ("eval/all/exact_accuracy >= 0.5 for all", True),
                                            ("eval/all/exact_accuracy > 0.95 for any", False),
                                            ("eval/all/exact_accuracy >= 0.7 for exp03_c", True)]
    text = guide.render_guide(g, st, now=NOW)
    assert "**✅ Complete**" in text
    assert f"- [x] {BASELINE_CRIT}\n" in text
    assert "- [ ] eval/all/exact_accuracy > 0.95 for any — not met" in text
    assert "| `exp03_b` | ✅ completed | 1000 / 1000 (100%) | 0.9000 (step 1000) | 2.0 h |" in text

    write_run(tmp_path, "exp03_b", "completed", acc=0.8, step=1000)
    text = guide.render_guide(g, status.group_status(g), now=NOW)
    assert f"- [ ] {BASELINE_CRIT} — not met" in text


def test_criteria_partial_data():
    g = make_group()
    runs = {"exp03_a": {"state": "completed", "summary": {"final_eval": {"eval/all/exact_accuracy": 0.3}}},
            "exp03_b": {"state": "not_started", "summary": None}}
    results = dict(status.check_criteria(g, runs))
    assert results["eval/all/exact_accuracy >= 0.5 for all"] is False  # one finished run already fails
    assert results["eval/all/exact_accuracy > 0.95 for any"] is None  # others may still get there
    assert results[BASELINE_CRIT] is None


def test_failed_group(tmp_path):
    g = make_group(output_root=str(tmp_path))
    write_run(tmp_path, "exp03_a", "completed", acc=0.9)
    write_run(tmp_path, "exp03_b", "failed")
    st = status.group_status(g)  # exp03_c never started
    assert st["state"] == "Failed"
    assert "**❌ Failed**" in guide.render_guide(g, st, now=NOW)


def test_not_started_and_stale(tmp_path):
    assert status.run_status(str(tmp_path / "nothing"))["state"] == "not_started"
    d = write_run(tmp_path, "exp03_a", "running", heartbeat=time.time() - 3600)
    assert status.run_status(str(d))["state"] == "stale"
    assert status.run_status(str(d), stale_after=7200)["state"] == "running"
    g = make_group(output_root=str(tmp_path))
    assert status.group_status(g)["state"] == "Running"  # stale still needs someone to act


def test_corrupt_status_is_unknown(tmp_path):
    d = write_run(tmp_path, "exp03_a")
    (d / "status.json").write_text('{"state": "runn')
    s = status.run_status(str(d))
    assert s["state"] == "unknown" and "status.json" in s["error"]
    (d / "status.json").write_text(json.dumps({"state": "exploded"}))
    assert status.run_status(str(d))["state"] == "unknown"
    (d / "status.json").write_text(json.dumps({"state": "completed", "step": 5, "total": 5}))
    (d / "summary.json").write_text("[1, 2")
    s = status.run_status(str(d))
    assert s["state"] == "completed" and s["summary"] is None and "summary.json" in s["error"]


def test_gcs_run_dir(monkeypatch):
    from kellen import gcs

    objects = {"gs://bkt/runs/exp03/exp03_a/status.json": json.dumps({"state": "preempted", "step": 7, "total": 9})}

    def read_text(url):
        if url.startswith("gs://bkt/runs/exp03/exp03_c"):
            raise RuntimeError("no credentials")
        if url not in objects:
            raise FileNotFoundError(url)
        return objects[url]

    monkeypatch.setattr(gcs, "read_text", read_text)
    monkeypatch.setattr(status, "_gcs_unreachable", lambda bucket: None)  # the bucket answers
    st = status.group_status(make_group(), output_root="gs://bkt/runs")
    states = {k: v["state"] for k, v in st["runs"].items()}
    assert states == {"exp03_a": "preempted", "exp03_b": "not_started", "exp03_c": "unknown"}
    assert "no credentials" in st["runs"]["exp03_c"]["error"]
    assert st["state"] == "Running"


def test_strict_undefined(tmp_path):
    (tmp_path / "experiment_guide.md").write_text("{{ group.id }} {{ group.no_such_field }}\n")
    with pytest.raises(jinja2.UndefinedError):
        guide.render_guide(make_group(), template_dir=str(tmp_path))
    (tmp_path / "experiment_guide.md").write_text("{{ group.id }} {{ badge }}\n")
    assert guide.render_guide(make_group(), template_dir=str(tmp_path)) == "exp03 ⏸️ Not Started\n"


def test_write_guides_only_rewrites_on_change(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "guides"
    g = make_group(output_root=str(runs))
    [path] = guide.write_guides([g], out_dir=str(out), now=NOW)
    assert path == str(out / "exp03.md") and "Last updated: 2026-11-02 09:30 UTC" in open(path).read()
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    later = NOW + datetime.timedelta(hours=3)
    assert guide.write_guides([g], out_dir=str(out), now=later) == [path]
    assert os.stat(path).st_mtime_ns == 1_000_000_000  # only the timestamp differed
    assert "09:30 UTC" in open(path).read()
    write_run(runs, "exp03_a", "running")
    guide.write_guides([g], out_dir=str(out), now=later)
    text = open(path).read()
    assert os.stat(path).st_mtime_ns != 1_000_000_000 and "12:30 UTC" in text and "▶️ running" in text
    assert [p.name for p in out.iterdir()] == ["exp03.md"]  # no temp files left behind


def test_cli(tmp_path, monkeypatch, capsys):
    from kellen.experiments import spec

    def load_group(name, *a, **k):
        if name != "exp03":
            raise spec.SpecError(f"configs/experiments/{name}.yaml: no such spec")
        return make_group(output_root=str(tmp_path / "runs"))

    monkeypatch.setattr(spec, "load_group", load_group, raising=False)
    monkeypatch.setattr(spec, "load_all", lambda *a, **k: [make_group()], raising=False)
    assert guide.main(["exp03", "--out", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g" / "exp03.md").exists()
    assert guide.main(["--all", "--no-status", "--out", str(tmp_path / "h")]) == 0
    assert (tmp_path / "h" / "exp03.md").exists()
    capsys.readouterr()
    assert guide.main(["exp99", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exp99" in err
    assert guide.main([]) == 2

    parser = argparse.ArgumentParser(prog="kellen")
    guide.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["guide", "exp03", "--no-status", "--output-root", "gs://b/runs"])
    assert args.fn is guide.cmd_guide and args.groups == ["exp03"] and args.no_status


def test_unreachable_gcs_is_unknown_after_one_bounded_probe(monkeypatch):
    import time

    from kellen import gcs

    calls = []
    monkeypatch.setattr(gcs, "exists", lambda url: calls.append(url) or time.sleep(30))  # a dead network
    monkeypatch.setattr(status, "GCS_PROBE_SECONDS", 0.5)
    status._gcs_unreachable.cache_clear()
    t = time.time()
    st = status.group_status(make_group(), output_root="gs://deadbucket/runs")
    assert time.time() - t < 5 and calls == ["gs://deadbucket/"]  # one probe for the whole group
    assert {v["state"] for v in st["runs"].values()} == {"unknown"}
    assert "did not answer" in st["runs"]["exp03_a"]["error"]
    assert st["state"] == "Not Started"
    status._gcs_unreachable.cache_clear()
