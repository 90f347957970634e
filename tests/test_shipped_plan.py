"""The researcher's plan as shipped: configs/experiments/*.yaml give the runs the plan asks for,
and the generated configs/<run>.yaml and guides in the repo are up to date with their specs."""
import math
import subprocess
import sys

import pytest

from kellen.experiments.spec import load_all

PLAN = {  # group -> (dotted variable, values per run)
    "exp01": {"arch.hidden_size": [256, 384, 512, 768, 1024, 1536], "arch.num_heads": [4, 6, 8, 8, 8, 8]},
    "exp02a": {"arch.L_cycles": [2, 4, 6, 8, 10, 12]},
    "exp02b": {"arch.H_cycles": [1, 2, 3, 4, 5]},
    "exp03": {"arch.L_layers": [1, 2, 3, 4, 6], "arch.L_cycles": [12, 6, 4, 3, 2]},
    "exp04a": {"data.subsample_size": [100, 250, 500, 1000, 2000, 5000]},
    "exp04b": {"data.num_aug": [10, 100, 500, 1000, 2000]},
    "exp05": {"arch.halt_max_steps": [4, 8, 12, 16, 24, 32]},
    "exp06": {"global_batch_size": [1536, 3072, 6144, 12288, 24576, 49152]},
    "exp07": {"arch.forward_dtype": ["float32", "bfloat16", "float16"]},
    "exp08": {"ema": [False, True, True, True, True], "ema_rate": [0.999, 0.99, 0.995, 0.999, 0.9995]},
    "exp09": {"optimizer": ["adam_atan2", "adamw", "adamw", "adamw", "lion"], "beta2": [0.95, 0.95, 0.99, 0.999, 0.99]},
    "exp10": {"lr": [3e-5, 1e-4, 3e-4, 1e-4, 1e-4], "lr_min_ratio": [1.0, 1.0, 1.0, 0.1, 0.01]},
}
BASELINE = {"arch.mlp_t": True, "arch.pos_encodings": "none", "arch.L_layers": 2, "arch.H_cycles": 3,
            "arch.L_cycles": 6, "arch.hidden_size": 512, "arch.num_heads": 8, "global_batch_size": 6144,
            "epochs": 50000, "eval_interval": 5000, "lr": 1e-4, "lr_min_ratio": 1.0, "lr_warmup_steps": 2000,
            "weight_decay": 1.0, "puzzle_emb_lr": 1e-4, "puzzle_emb_weight_decay": 1.0, "ema": True,
            "ema_rate": 0.999, "arch.halt_max_steps": 16, "arch.halt_exploration_prob": 0.1,
            "arch.forward_dtype": "bfloat16"}


def lookup(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


@pytest.fixture(scope="module")
def groups():
    return load_all()


def test_every_plan_group_has_its_runs(groups):
    assert set(groups) == set(PLAN) | {"demo"}
    for gid, variables in PLAN.items():
        g = groups[gid]
        assert [r.name for r in g.runs] == [f"{gid}_{chr(ord('a') + i)}" for i in range(len(g.runs))]
        for path, values in variables.items():
            assert [r.values[path] for r in g.runs] == values, (gid, path)
        assert g.baseline_run is not None and g.success_criteria and g.hypothesis and g.analysis
        for r in g.runs:
            assert r.config["group"] == gid and r.config["run_name"] == r.name
            assert r.config["checkpoint_path"] == f"gs://sculptor-tpu-experiments/checkpoints/{gid}/{r.name}"


def test_baseline_runs_are_the_plan_baseline(groups):
    for gid in PLAN:
        base = groups[gid].baseline_run
        for path, want in BASELINE.items():
            if gid == "exp06" and path in ("lr",):
                continue
            assert lookup(base.config, path) == want, (gid, base.name, path)


def test_exp06_scales_lr_by_sqrt_batch(groups):
    for r in groups["exp06"].runs:
        want = 1e-4 * math.sqrt(r.config["global_batch_size"] / 6144)
        assert math.isclose(r.config["lr"], want, rel_tol=1e-12)
        assert math.isclose(r.config["puzzle_emb_lr"], want, rel_tol=1e-12)


def test_data_groups_point_at_their_own_builds(groups):
    paths = [r.config["data_paths"][0] for r in groups["exp04a"].runs]
    assert len(set(paths)) == 6 and all(p.startswith("gs://sculptor-tpu-experiments/data/") for p in paths)
    assert "n100-" in paths[0] and "n5000-" in paths[-1]


def test_generated_configs_and_guides_are_up_to_date():
    # Regenerating writes nothing: the committed configs/<run>.yaml match the specs.
    check = subprocess.run([sys.executable, "-m", "kellen.cli", "generate", "--all", "--check"],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "0 to write" in check.stdout
