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
register()


@hydra.main(version_base="1.3", config_path="configs", config_name="cfg_pretrain")
def main(hcfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from kellen.data.format import DataError
    from kellen.model.config import ConfigError
    from kellen.train import distributed, loop
    from kellen.train.loop import NonFiniteLoss
    from kellen.train.resume import Preempted
    from kellen.train.run_record import default_group, run_name

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
    except NonFiniteLoss as e:  # FAILED.txt and status.json say so; no traceback needed here
        print(f"pretrain_jax.py: error: {e} (see FAILED.txt in the run dir)", file=sys.stderr)
        sys.exit(1)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError) as e:
        print(f"pretrain_jax.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
