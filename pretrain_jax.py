#!/usr/bin/env python
"""Train one TRM run; every host of a pod runs this same command.

    python pretrain_jax.py --config-name exp03_a epochs=10000
    python pretrain_jax.py +experiment=quick_test
    python pretrain_jax.py --multirun lr=1e-4,3e-4 +experiment=quick_test

Configs compose from configs/ over the typed schema in kellen/train/config.py; the run record goes
to <output_root>/<group>/<run name>/ (see kellen/train/run_record.py).
"""
from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from kellen.train.config import check_known_keys, register

REPO = os.path.dirname(os.path.abspath(__file__))
PROG = "pretrain_jax.py"
_HYDRA_FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR")  # the user's own setting
register()


def _one_line(e: BaseException) -> str:
    """The first paragraph of an error and of its cause, on one line (Hydra's are multi-line)."""
    parts = []
    for x in (e, e.__cause__):
        text = str(x or "").strip().split("\n\n")[0]
        line = " ".join(ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(("    ", "\t")))
        if line and not any(line in p for p in parts):
            parts.append(line)
    return ": ".join(parts) or type(e).__name__


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="configs", config_name="cfg_pretrain")
def main(hcfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from kellen.data.format import DataError
    from kellen.model.config import ConfigError
    from kellen.train import distributed, loop
    from kellen.train.checkpoint import CheckpointSaveError
    from kellen.train.loop import NonFiniteLoss
    from kellen.train.resume import Preempted
    from kellen.train.run_record import default_group, run_name

    _restore_hydra_errors()  # from here on a failure is the run's: Hydra reports it as usual
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    try:
        check_known_keys(hcfg)
        cfg = OmegaConf.to_object(hcfg)
        distributed.initialize(cfg.distributed)  # before anything asks JAX for devices
        distributed.enable_compilation_cache(cfg.compilation_cache_dir)
        name = run_name(cfg.run_name, hc.job.config_name, overrides)
        group = cfg.group or default_group(name)
        run_dir = os.path.join(cfg.output_root, group, name) if not cfg.output_root.startswith("gs://") \
            else f"{cfg.output_root.rstrip('/')}/{group}/{name}"
        loop.run(cfg, run_dir, OmegaConf.to_yaml(hcfg, resolve=True), overrides, REPO, group=group, name=name,
                 argv=sys.argv[1:])
    except Preempted as e:
        print(f"pretrain_jax.py: {e}", file=sys.stderr)
        sys.exit(Preempted.exit_code)  # 75: preempted, resumable
    except (NonFiniteLoss, CheckpointSaveError) as e:  # FAILED.txt and status.json say so; no traceback here
        print(f"pretrain_jax.py: error: {e} (see FAILED.txt in the run dir)", file=sys.stderr)
        sys.exit(1)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError) as e:
        print(f"pretrain_jax.py: error: {e}", file=sys.stderr)
        sys.exit(2)


def _restore_hydra_errors() -> None:
    if _HYDRA_FULL_ERROR is None:
        os.environ.pop("HYDRA_FULL_ERROR", None)
    else:
        os.environ["HYDRA_FULL_ERROR"] = _HYDRA_FULL_ERROR


if __name__ == "__main__":
    # A bad command line or config (unknown flag or key, wrong type, missing or unparsable config
    # file, bad override syntax) is one line on stderr and exit 2, before anything runs: Hydra's
    # own report is several lines and exit 1. Its flags are checked first with its own parser; then
    # it raises composition errors instead of reporting them (HYDRA_FULL_ERROR, until main starts).
    import yaml
    from hydra._internal.utils import get_args_parser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    flags = get_args_parser()
    flags.error = lambda message: _fail(f"{message} (see {PROG} --help)")
    flags.parse_args()
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as e:
        if _HYDRA_FULL_ERROR:
            raise
        override = getattr(e, "override", None)  # OverrideParseException: say which one
        _fail((f"override {override!r}: " if override else "") + _one_line(e))
