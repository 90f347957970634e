"""`kellen import-torch CKPT OUT`: a reference `pretrain.py` state_dict -> our weights on disk.

CKPT is what the reference saves (`torch.save(model.state_dict(), .../step_N)`, any file
name, read with the optional torch extra) or an .npz of name -> array. OUT is a directory
with `model.json` (the TRMConfig) and `weights/` (an Orbax pytree checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import zipfile
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from kellen.interop.torch_names import canonical_name, torch_to_weights
from kellen.model.config import ConfigError, TRMConfig


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, AttributeError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: not a readable .npz ({' '.join(str(e).split())})") from None
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: neither an .npz nor a torch.save zip archive")
    try:
        import torch  # optional extra: pip install 'kellen[torch]'
    except ImportError as e:
        raise RuntimeError(f"{path}: reading a torch checkpoint needs the torch extra "
                           "(pip install 'kellen[torch]'), or convert it to .npz first") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state_dict (name -> tensor), got {type(state).__name__}")
    return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}


def infer_arch(state: Mapping[str, np.ndarray]) -> Dict[str, Any]:
    """Sizes that the tensors pin down; everything else comes from the defaults or --arch."""
    named = {canonical_name(k)[len("model.inner."):]: np.shape(v) for k, v in state.items()}
    arch: Dict[str, Any] = {}
    if "embed_tokens.embedding_weight" in named:
        arch["vocab_size"], arch["hidden_size"] = named["embed_tokens.embedding_weight"]
    layers = {int(m.group(1)) for n in named if (m := re.match(r"L_level\.layers\.(\d+)\.", n))}
    if layers:
        arch["L_layers"] = max(layers) + 1
    arch["mlp_t"] = any(".mlp_t." in n for n in named)
    if "puzzle_emb.weights" in named:
        arch["num_puzzle_identifiers"], arch["puzzle_emb_ndim"] = named["puzzle_emb.weights"]
    else:
        arch["puzzle_emb_ndim"], arch["puzzle_emb_len"] = 0, 0
    if "embed_pos.embedding_weight" in named:
        arch["pos_encodings"] = "learned"
        total_len = named["embed_pos.embedding_weight"][0]
    elif arch["mlp_t"] and "L_level.layers.0.mlp_t.gate_up_proj.weight" in named:
        total_len = named["L_level.layers.0.mlp_t.gate_up_proj.weight"][1]
    else:
        total_len = None
    arch["_total_len"] = total_len
    return arch


def resolve_config(state: Mapping[str, np.ndarray], overrides: Mapping[str, Any]) -> TRMConfig:
    arch = infer_arch(state)
    total_len = arch.pop("_total_len")
    arch.update(overrides)
    cfg = TRMConfig.from_dict(arch, where="import-torch")
    if total_len is not None and "seq_len" not in overrides:
        cfg = cfg.replace(seq_len=total_len - cfg.prefix_len)
        cfg.validate("import-torch")
    return cfg


def save_weights(out_dir: str, cfg: TRMConfig, weights: Dict[str, Any]) -> None:
    """Write OUT atomically: build in a sibling temp dir, then rename into place."""
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir}: already exists; refusing to overwrite")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".import-", dir=parent)
    try:
        with open(os.path.join(tmp, "model.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2, sort_keys=True)
        with ocp.PyTreeCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, "weights"), weights)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_weights(out_dir: str) -> Tuple[TRMConfig, Dict[str, Any]]:
    import orbax.checkpoint as ocp

    with open(os.path.join(out_dir, "model.json")) as f:
        cfg = TRMConfig.from_dict(json.load(f), where=os.path.join(out_dir, "model.json"))
    with ocp.PyTreeCheckpointer() as ckptr:
        weights = ckptr.restore(os.path.abspath(os.path.join(out_dir, "weights")))
    return cfg, weights


def import_torch(ckpt: str, out_dir: str, overrides: Optional[Mapping[str, Any]] = None) -> TRMConfig:
    if os.path.exists(out_dir):  # refused before the conversion too (save_weights checks again)
        raise FileExistsError(f"{os.path.abspath(out_dir)}: already exists; refusing to overwrite")
    state = load_state_dict(ckpt)
    cfg = resolve_config(state, overrides or {})
    weights = torch_to_weights(state, cfg, source=ckpt)
    save_weights(out_dir, cfg, weights)
    return cfg


def parse_overrides(items) -> Dict[str, Any]:
    """`key=value` pairs; values parsed as YAML scalars (ints, floats, booleans, strings)."""
    import yaml

    out = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"--arch {item!r}: expected key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out
