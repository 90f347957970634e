"""Running pretrain_jax.py as a researcher does: real subprocesses, real Hydra."""
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
TEST_CONFIGS = REPO / "tests" / "configs"


def clean_env(extra=None):
    """The environment without the test session's 8-device XLA flag (runs pick their own devices)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["WANDB_MODE"] = "disabled"  # W&B's own tests opt in (offline) through `extra`
    env.update(extra or {})
    return env


def pretrain(*overrides, cwd=None, env=None, timeout=600, popen=False):
    cmd = [sys.executable, str(REPO / "pretrain_jax.py"), "--config-dir", str(TEST_CONFIGS), *map(str, overrides)]
    if popen:
        return subprocess.Popen(cmd, cwd=cwd or REPO, env=env or clean_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd or REPO, env=env or clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def metrics(run_dir):
    path = pathlib.Path(run_dir) / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]
