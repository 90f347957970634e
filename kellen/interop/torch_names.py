"""Map the reference PyTorch `state_dict` names and layouts onto our weights, and back.

Reference names look like `model.inner.L_level.layers.0.mlp.gate_up_proj.weight`
(ACTLossHead -> .model -> .inner), with `_orig_mod.` in front when saved from a
torch.compile'd model. Linear weights are [out, in]; ours are [in, out] kernels with the
per-layer tensors stacked on axis 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import numpy as np

from kellen.model.config import TRMConfig
from kellen.model.trm import dtype_of, weight_shapes

PREFIX = "model.inner."
# Buffers the reference may carry that hold no learned state (recomputed or scratch).
_SCRATCH_SUFFIXES = ("rotary_emb.cos_cached", "rotary_emb.sin_cached", "puzzle_emb.local_weights",
                     "puzzle_emb.local_ids")


class TensorMismatch(ValueError):
    """A missing, unexpected or mis-shaped tensor; the message names it."""


@dataclass(frozen=True)
class Slot:
    path: Tuple[str, ...]  # path into our weights dict
    layer: Optional[int]  # index on the stacked axis, for per-layer tensors
    transpose: bool  # torch Linear [out, in] <-> our [in, out]
    torch_shape: Tuple[int, ...]


def canonical_name(name: str) -> str:
    """Strip `_orig_mod.` (torch.compile) and accept names with or without `model.inner.`."""
    name = name.replace("_orig_mod.", "")
    for head in ("model.inner.", "inner.", "model."):
        if name.startswith(head):
            return PREFIX + name[len(head):]
    return PREFIX + name


def expected_tensors(cfg: TRMConfig) -> Dict[str, Slot]:
    """Every tensor a reference state_dict holds for this config, with where it goes."""
    shapes = weight_shapes(cfg)
    slots: Dict[str, Slot] = {}

    def add(name, path, transpose=False, layer=None):
        shape = _get(shapes, path).shape
        if layer is not None:
            shape = shape[1:]
        torch_shape = tuple(reversed(shape)) if transpose else tuple(shape)
        slots[PREFIX + name] = Slot(path, layer, transpose, torch_shape)

    add("H_init", ("z_init", "H"))
    add("L_init", ("z_init", "L"))
    add("embed_tokens.embedding_weight", ("params", "embed_tokens"))
    add("lm_head.weight", ("params", "lm_head"), transpose=True)
    add("q_head.weight", ("params", "q_head", "kernel"), transpose=True)
    add("q_head.bias", ("params", "q_head", "bias"))
    if cfg.pos_encodings == "learned":
        add("embed_pos.embedding_weight", ("params", "embed_pos"))
    if cfg.puzzle_dim > 0:
        add("puzzle_emb.weights", ("puzzle_emb",))
    per_layer = [("mlp.gate_up_proj.weight", "mlp_gate_up"), ("mlp.down_proj.weight", "mlp_down")]
    if cfg.mlp_t:
        per_layer += [("mlp_t.gate_up_proj.weight", "mlp_t_gate_up"), ("mlp_t.down_proj.weight", "mlp_t_down")]
    else:
        per_layer += [("self_attn.qkv_proj.weight", "attn_qkv"), ("self_attn.o_proj.weight", "attn_out")]
    for i in range(cfg.L_layers):
        for torch_leaf, ours in per_layer:
            add(f"L_level.layers.{i}.{torch_leaf}", ("params", "blocks", ours), transpose=True, layer=i)
    return slots


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def torch_to_weights(state_dict: Mapping[str, Any], cfg: TRMConfig, source: str = "checkpoint") -> Dict[str, Any]:
    """Reference state_dict (name -> array) to our weights (numpy float32 leaves, z_init in forward dtype)."""
    slots = expected_tensors(cfg)
    shapes = weight_shapes(cfg)
    out = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), shapes)
    seen = set()
    for raw_name, value in state_dict.items():
        name = canonical_name(raw_name)
        if name.endswith(_SCRATCH_SUFFIXES):
            continue
        if name not in slots:
            raise TensorMismatch(f"{source}: unexpected tensor '{raw_name}' (shape {tuple(np.shape(value))}) "
                                 f"for this config (mlp_t={cfg.mlp_t}, L_layers={cfg.L_layers}, "
                                 f"pos_encodings={cfg.pos_encodings}, puzzle_emb_ndim={cfg.puzzle_dim})")
        slot = slots[name]
        arr = np.asarray(value, dtype=np.float32)
        if arr.shape != slot.torch_shape:
            raise TensorMismatch(f"{source}: tensor '{raw_name}' has shape {arr.shape}, "
                                 f"but the config needs {slot.torch_shape}")
        arr = arr.T if slot.transpose else arr
        leaf = _get(out, slot.path)
        if slot.layer is None:
            leaf[...] = arr
        else:
            leaf[slot.layer] = arr
        seen.add(name)
    missing = [n for n in slots if n not in seen]
    if missing:
        n = missing[0]
        raise TensorMismatch(f"{source}: missing tensor '{n}' (expected shape {slots[n].torch_shape})"
                             + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    out["z_init"] = {k: np.asarray(v).astype(dtype_of(cfg)) for k, v in out["z_init"].items()}
    return out


def params_to_torch(tree: Dict[str, Any], cfg: TRMConfig, only_params: bool = False) -> Dict[str, np.ndarray]:
    """Our weights (or a same-shaped gradient tree) to reference names and layouts."""
    named = {}
    for name, slot in expected_tensors(cfg).items():
        if only_params and slot.path[0] != "params":
            continue
        arr = np.asarray(_get(tree, slot.path), dtype=np.float32)
        arr = arr[slot.layer] if slot.layer is not None else arr
        named[name] = arr.T if slot.transpose else arr
    return named
