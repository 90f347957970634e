"""Examples/s of the reference PyTorch TRM's training step, on this machine, for comparison.

Issue 4 quotes the reference at 13.1 (mlp_t) and 18.3 (attention) examples/s "on 2 CPU cores";
this script measures the reference on the machine that runs `bench/train_step.py`, with the same
config (B=64, hidden 128, 8 heads, H3/L6, L_layers 2, seq 81 + 16 puzzle tokens, rope, fp32),
one ACT step per optimizer step, `torch.optim.AdamW`, stablemax loss as the reference trains.

The reference is not vendored: point `--reference-repo` at a checkout of
SamsungSAILMontreal/TinyRecursiveModels. Needs torch, pydantic and einops (a separate venv is
fine: `pip install torch numpy pydantic einops`).

Usage:
  python bench/reference_torch.py --reference-repo PATH [--mlp-t] [--batch 64] [--steps 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def build(args, mlp_t: bool):
    sys.path.insert(0, os.path.abspath(args.reference_repo))
    import torch
    from models.losses import ACTLossHead
    from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1

    cfg = dict(batch_size=args.batch, seq_len=81, puzzle_emb_ndim=args.hidden, num_puzzle_identifiers=1,
               vocab_size=11, H_cycles=3, L_cycles=6, H_layers=0, L_layers=2, hidden_size=args.hidden,
               expansion=4, num_heads=8, pos_encodings="rope", halt_max_steps=16,
               halt_exploration_prob=0.1, forward_dtype="float32", mlp_t=mlp_t, puzzle_emb_len=16)
    model = ACTLossHead(TinyRecursiveReasoningModel_ACTV1(cfg), loss_type="stablemax_cross_entropy")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(2, 11, (args.batch, 81), generator=g)
    inputs = torch.where(torch.rand(args.batch, 81, generator=g) < 0.5, labels, torch.ones_like(labels))
    batch = {"inputs": inputs, "labels": labels,
             "puzzle_identifiers": torch.zeros(args.batch, dtype=torch.long)}
    return model, opt, batch


def run(args, mlp_t: bool) -> float:
    import torch

    model, opt, batch = build(args, mlp_t)
    carry = model.initial_carry(batch)
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        carry, loss, _metrics, _out, _halted = model(carry=carry, batch=batch, return_keys=[])
        (loss / args.batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    name = "mlp_t" if mlp_t else "attention"
    print(f"{name:9s} B={args.batch} torch {torch.__version__} threads={torch.get_num_threads()} "
          f"step {step * 1e3:.1f} ms ({' '.join(f'{t:.2f}' for t in times)} s) -> {args.batch / step:.1f} ex/s")
    return args.batch / step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference-repo", default=os.environ.get("KELLEN_REFERENCE_REPO"),
                    help="checkout of SamsungSAILMontreal/TinyRecursiveModels")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--mlp-t", action="store_true", help="only the mlp_t variant")
    ap.add_argument("--attention", action="store_true", help="only the attention variant")
    args = ap.parse_args(argv)
    if not args.reference_repo or not os.path.isdir(os.path.join(args.reference_repo, "models")):
        sys.exit("reference_torch.py: --reference-repo must name a checkout of "
                 "SamsungSAILMontreal/TinyRecursiveModels (it has models/)")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    variants = [False, True]
    if args.mlp_t != args.attention:
        variants = [args.mlp_t]
    for mlp_t in variants:
        run(args, mlp_t)


if __name__ == "__main__":
    main()
