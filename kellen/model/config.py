"""Typed TRM architecture config: the fields of the reference's `config/arch/trm.yaml`.

Defaults are the paper's Sudoku/ARC TRM. Data-dependent sizes (seq_len, vocab_size,
num_puzzle_identifiers) come from the dataset at run time.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

POS_ENCODINGS = ("rope", "learned", "none")
# float64 is for diagnostics on CPU/GPU (parity noise floor) and needs jax_enable_x64.
FORWARD_DTYPES = ("bfloat16", "float32", "float16", "float64")
LOSS_TYPES = ("stablemax_cross_entropy", "softmax_cross_entropy")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


@dataclass(frozen=True)
class TRMConfig:
    # Data-dependent sizes.
    seq_len: int = 81
    vocab_size: int = 11
    num_puzzle_identifiers: int = 1
    # Recursion.
    H_cycles: int = 3
    L_cycles: int = 6
    H_layers: int = 0  # ignored, as in the reference: TRM has one reasoning module
    L_layers: int = 2
    # Transformer.
    hidden_size: int = 512
    num_heads: int = 8
    expansion: float = 4.0
    puzzle_emb_ndim: Optional[int] = None  # None = hidden_size (the reference's ${.hidden_size})
    puzzle_emb_len: int = 16  # 0 = ceil(puzzle_emb_ndim / hidden_size)
    pos_encodings: str = "rope"
    mlp_t: bool = False  # sequence-axis SwiGLU instead of attention
    forward_dtype: str = "bfloat16"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Adaptive computation time.
    halt_max_steps: int = 16
    halt_exploration_prob: float = 0.1
    no_ACT_continue: bool = True
    loss_type: str = "stablemax_cross_entropy"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "config") -> "TRMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - {"name", "loss", "causal", "batch_size"})
        if unknown:
            raise ConfigError(f"{where}: unknown arch key '{unknown[0]}' (known: {', '.join(sorted(known))})")
        cfg = cls(**{k: v for k, v in values.items() if k in known})
        cfg.validate(where)
        return cfg

    def replace(self, **changes: Any) -> "TRMConfig":
        return dataclasses.replace(self, **changes)

    # ---- derived sizes -------------------------------------------------------------
    @property
    def puzzle_dim(self) -> int:
        return self.hidden_size if self.puzzle_emb_ndim is None else self.puzzle_emb_ndim

    @property
    def prefix_len(self) -> int:
        """Number of puzzle-embedding prefix tokens (the reference's `puzzle_emb_len`)."""
        if self.puzzle_emb_len:
            return self.puzzle_emb_len
        return -(self.puzzle_dim // -self.hidden_size)

    @property
    def total_len(self) -> int:
        return self.seq_len + self.prefix_len

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def swiglu_inner(self, width: int) -> int:
        """The reference's SwiGLU inner size: round(expansion*width*2/3) up to a multiple of 256."""
        return -(round(self.expansion * width * 2 / 3) // -256) * 256

    # ---- validation -----------------------------------------------------------------
    def validate(self, where: str = "config") -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{where}: arch.{key}={getattr(self, key)!r} {why}")

        for key in ("seq_len", "vocab_size", "num_puzzle_identifiers", "hidden_size", "num_heads",
                    "L_layers", "H_cycles", "L_cycles", "halt_max_steps"):
            if int(getattr(self, key)) < 1:
                raise bad(key, "must be >= 1")
        if self.pos_encodings not in POS_ENCODINGS:
            raise bad("pos_encodings", f"must be one of {POS_ENCODINGS}")
        if self.forward_dtype not in FORWARD_DTYPES:
            raise bad("forward_dtype", f"must be one of {FORWARD_DTYPES}")
        if self.loss_type not in LOSS_TYPES:
            raise bad("loss_type", f"must be one of {LOSS_TYPES}")
        if not self.mlp_t and self.hidden_size % self.num_heads:
            raise bad("num_heads", f"must divide hidden_size={self.hidden_size}")
        if self.pos_encodings == "rope" and not self.mlp_t and self.head_dim % 2:
            raise bad("num_heads", "gives an odd head_dim; RoPE needs an even one")
        if self.puzzle_dim < 0:
            raise bad("puzzle_emb_ndim", "must be >= 0")
        if self.puzzle_emb_len < 0:
            raise bad("puzzle_emb_len", "must be >= 0")
        if self.puzzle_dim == 0 and self.puzzle_emb_len > 0:
            raise bad("puzzle_emb_len", "must be 0 when puzzle_emb_ndim is 0 (no puzzle prefix)")
        if self.puzzle_dim > self.prefix_len * self.hidden_size:
            raise bad("puzzle_emb_ndim", f"exceeds puzzle_emb_len*hidden_size={self.prefix_len * self.hidden_size}")
        if not 0.0 <= self.halt_exploration_prob <= 1.0:
            raise bad("halt_exploration_prob", "must be in [0, 1]")
        if self.expansion <= 0 or not math.isfinite(self.expansion):
            raise bad("expansion", "must be a positive number")
