"""Sparse sign-SGD for the puzzle-embedding table.

Mirrors the reference `CastedSparseEmbeddingSignSGD_Distributed`: gradients of the
gathered rows are summed per unique puzzle id, and only those rows move:
    p_u <- p_u * (1 - lr*wd) - lr * sign(sum of grads for u)
The table can have ~1e6 rows, so nothing here is [N, D] except the scatter into the
table itself; the work is O(B * D) for a batch of B rows.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec


def _explicit_replicated(x):
    """Replicated sharding on x's mesh if x is sharded over an explicit axis, else None.

    Auto-mode and single-device arrays report no named axes and need nothing.
    """
    sharding = jax.typeof(x).sharding
    spec = getattr(sharding, "spec", None)
    if spec is not None and any(s is not None for s in spec):
        return NamedSharding(sharding.mesh, PartitionSpec())
    return None


def _replicated(x):
    # Under an explicit-axis mesh, sort (inside unique) refuses a sharded axis, so
    # gather the batch first, as the reference all_gathers ids and grads.
    target = _explicit_replicated(x)
    return x if target is None else jax.sharding.reshard(x, target)


def sparse_signsgd_update(table: jax.Array, ids: jax.Array, row_grads: jax.Array, lr, weight_decay):
    """Return the updated table.

    table: [N, D]; ids: [B] int puzzle ids of the batch rows (duplicates allowed);
    row_grads: [B, D] loss gradient w.r.t. each gathered row. `lr` may be traced.
    Rows whose summed gradient is 0 still get the decay (sign(0) = 0), as in the
    reference. A batch sharded across devices works on Auto and Explicit meshes; the
    table keeps its sharding.
    """
    n_rows = table.shape[0]
    batch = ids.shape[0]
    ids = _replicated(ids.astype(jnp.int32))
    row_grads = _replicated(row_grads)
    # Static-size unique: padding slots get id N, which the scatter drops.
    uids, inv = jnp.unique(ids, size=batch, fill_value=n_rows, return_inverse=True)
    grad = jax.ops.segment_sum(
        row_grads.astype(jnp.float32), inv.reshape(-1), num_segments=batch
    )
    # A row-sharded table under an explicit mesh needs the gathered rows' sharding named.
    rows = table.at[uids].get(
        mode="fill", fill_value=0, out_sharding=_explicit_replicated(table)
    ).astype(jnp.float32)
    lr = jnp.asarray(lr, jnp.float32)
    new = rows * (1.0 - lr * weight_decay) - lr * jnp.sign(grad)
    # The table keeps its own sharding (named only where an explicit mesh requires it).
    keep = jax.typeof(table).sharding if _explicit_replicated(table) is not None else None
    return table.at[uids].set(new.astype(table.dtype), mode="drop", out_sharding=keep)
