"""The typed schema of a training run: every default lives here, once.

Hydra YAML under `configs/` only overrides these. Keys keep the reference `pretrain.py` names
(and the researcher's extra keys: use_tpu, num_workers, save_checkpoint_steps, ...) so existing
configs port unchanged; unknown keys and wrong types fail at compose time, naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from kellen.model.config import TRMConfig


@dataclass
class LossConfig:
    name: str = "losses@ACTLossHead"
    loss_type: str = "stablemax_cross_entropy"


@dataclass
class ArchConfig:
    """The reference `config/arch/trm.yaml`; sizes that come from the data are not here."""
    name: str = "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1"
    loss: LossConfig = field(default_factory=LossConfig)
    halt_exploration_prob: float = 0.1
    halt_max_steps: int = 16
    H_cycles: int = 3
    L_cycles: int = 6
    H_layers: int = 0
    L_layers: int = 2
    hidden_size: int = 512
    num_heads: int = 8
    expansion: float = 4.0
    puzzle_emb_ndim: Optional[int] = None  # None = hidden_size
    pos_encodings: str = "rope"
    forward_dtype: str = "bfloat16"
    mlp_t: bool = False
    puzzle_emb_len: int = 16
    no_ACT_continue: bool = True
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0


@dataclass
class MeshConfig:
    """Named device axes; one size may be -1 ("the rest"). The batch is split over `data_axes`."""
    axes: Dict[str, int] = field(default_factory=lambda: {"data": -1, "fsdp": 1})
    data_axes: List[str] = field(default_factory=lambda: ["data", "fsdp"])
    fsdp_axis: str = "fsdp"
    fsdp_min_size: int = 1 << 20  # parameters with fewer elements stay replicated


@dataclass
class DistributedConfig:
    """Multi-process JAX. On a TPU pod `auto` initialises from the TPU environment; elsewhere set
    these (or KELLEN_COORDINATOR / KELLEN_NUM_PROCESSES / KELLEN_PROCESS_ID)."""
    auto: bool = True
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    cpu_devices_per_process: Optional[int] = None  # CPU only: local devices per process
    heartbeat_timeout_seconds: int = 100  # a process silent this long is lost: the others fail and exit
    initialization_timeout_seconds: int = 300  # how long each process waits for all to connect


@dataclass
class WandbConfig:
    """Weights & Biases, written by process 0 only. The group is the run's experiment group."""
    mode: Optional[str] = None  # online | offline | disabled; None: WANDB_MODE, else online iff an API key is set
    project: Optional[str] = None  # None: project_name, else "TRM-Scaling-Research"
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)  # besides the group name
    job_type: str = "train"
    notes: Optional[str] = None
    init_timeout: float = 60.0  # seconds; past it (no network) W&B is skipped with a warning


@dataclass
class DataBuildConfig:
    """How to build data_paths[0] when it is missing (`kellen data <kind> --generate ...`)."""
    kind: str = "sudoku"  # sudoku | maze
    generate: int = 1000
    test_generate: int = 200
    num_aug: int = 0  # sudoku
    min_clues: int = 17  # sudoku
    aug: bool = False  # maze: dihedral images
    size: int = 30  # maze
    min_path_len: int = 0  # maze
    seed: int = 0


@dataclass
class PretrainConfig:
    arch: ArchConfig = field(default_factory=ArchConfig)
    # Data.
    data_paths: List[str] = field(default_factory=lambda: ["data/sudoku-extreme-1k-aug-1000"])
    data_paths_test: List[str] = field(default_factory=list)
    evaluators: List[Any] = field(default_factory=list)
    data_build: Optional[DataBuildConfig] = None
    # Training.
    global_batch_size: int = 768
    epochs: int = 100000
    eval_interval: Optional[int] = 10000
    min_eval_interval: Optional[int] = 0
    checkpoint_every_eval: bool = True
    save_checkpoint_steps: Optional[int] = None  # the researcher's name for checkpoint_every_steps
    checkpoint_every_steps: Optional[int] = None
    checkpoint_keep: int = 3  # latest K; the best by eval exact_accuracy is kept besides
    optimizer: str = "adam_atan2"
    lr_schedule: str = "cosine"
    lr: float = 1e-4
    lr_min_ratio: float = 1.0
    lr_warmup_steps: int = 2000
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    puzzle_emb_weight_decay: float = 0.1
    puzzle_emb_lr: float = 1e-2
    ema: bool = False
    ema_rate: float = 0.999
    freeze_weights: bool = False
    seed: int = 0
    eval_at_start: bool = False  # evaluate the untrained model too (a baseline row at step 0)
    max_steps: Optional[int] = None  # stop early (smoke tests); the LR schedule still spans all steps
    # Testing hook (fault injection): step k's loss and gradients are NaN, inside the jitted step, so
    # the NaN/inf check stops the run as a diverged one would. None (the default) changes nothing.
    fault_nan_at_step: Optional[int] = None
    # Names and places.
    project_name: Optional[str] = None
    run_name: Optional[str] = None
    group: Optional[str] = None  # experiment group; default from the config name (exp03_a -> exp03)
    output_root: str = "runs"
    checkpoint_path: Optional[str] = None  # default <run dir>/checkpoints
    load_checkpoint: Optional[str] = None
    eval_save_outputs: List[str] = field(default_factory=list)
    compilation_cache_dir: Optional[str] = "~/.cache/kellen/jax"  # null turns the cache off
    log_every: int = 1  # train metrics are fetched from the device every this many steps
    heartbeat_seconds: float = 30.0  # status.json's heartbeat is refreshed at most this often
    peak_tflops_per_device: Optional[float] = None  # for perf/mfu; None: a table by device kind
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # Execution.
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    use_tpu: Optional[bool] = None  # the researcher's key; the backend is detected
    num_workers: Optional[int] = None  # the researcher's key; hosts come from the TPU environment


def register() -> None:
    """Register the schema with Hydra's ConfigStore (cfg_pretrain.yaml lists it first)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="pretrain_schema", node=PretrainConfig)


def trm_config(arch, seq_len: int, vocab_size: int, num_puzzle_identifiers: int,
               where: str = "config") -> TRMConfig:
    """The model config: arch keys plus the sizes the dataset fixes."""
    values = {k: getattr(arch, k) for k in ArchConfig.__dataclass_fields__ if k not in ("name", "loss")}
    values["loss_type"] = arch.loss.loss_type
    return TRMConfig.from_dict(dict(values, seq_len=seq_len, vocab_size=vocab_size,
                                    num_puzzle_identifiers=num_puzzle_identifiers), where)


def check_known_keys(node, path: str = "") -> None:
    """Hydra's `+key=value` can add a key a dataclass node does not have; refuse it by name."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    from kellen.model.config import ConfigError

    if not isinstance(node, DictConfig):
        return
    kind = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else None
    for key in node.keys():
        full = f"{path}.{key}" if path else str(key)
        if known is not None and key not in known:
            raise ConfigError(f"unknown key '{full}' (not in {kind.__name__}; known: {', '.join(sorted(known))})")
        if known is not None:
            check_known_keys(node._get_node(key), full)
