"""The `kellen` command: data, parity, import-torch, demo."""
from __future__ import annotations

import argparse
import sys
import time


def cmd_parity(args) -> int:
    from kellen.interop.parity import run_parity

    status = 0
    for path in args.fixtures:
        report = run_parity(path)
        print(f"== {path}")
        print(report.format())
        status |= bool(report.failures)
    return status


def cmd_import_torch(args) -> int:
    from kellen.interop.import_torch import import_torch, parse_overrides

    cfg = import_torch(args.ckpt, args.out, parse_overrides(args.arch))
    print(f"wrote {args.out} (hidden_size={cfg.hidden_size}, L_layers={cfg.L_layers}, mlp_t={cfg.mlp_t}, "
          f"pos_encodings={cfg.pos_encodings}, seq_len={cfg.seq_len}, vocab_size={cfg.vocab_size})")
    return 0


def cmd_demo(args) -> int:
    """Placeholder job until pretrain_jax.py lands: train a small TRM on a toy reversal task."""
    import jax
    import jax.numpy as jnp

    from kellen.model.config import TRMConfig
    from kellen.train.step import OptimConfig, init_train_state, make_train_step

    cfg = TRMConfig(seq_len=12, vocab_size=10, num_puzzle_identifiers=4, hidden_size=64, num_heads=4,
                    H_cycles=2, L_cycles=2, L_layers=2, puzzle_emb_len=1, halt_max_steps=2,
                    forward_dtype="float32")
    opt = OptimConfig(lr=3e-3, lr_warmup_steps=20, lr_min_ratio=0.1, weight_decay=0.01)
    batch_size, steps = 64, args.steps

    def toy_batch(key):
        inputs = jax.random.randint(key, (batch_size, cfg.seq_len), 1, cfg.vocab_size)
        return {"inputs": inputs, "labels": inputs[:, ::-1],
                "puzzle_identifiers": jnp.zeros((batch_size,), jnp.int32)}

    key = jax.random.PRNGKey(args.seed)
    state = init_train_state(cfg, opt, steps, key, toy_batch(key))
    step_fn = jax.jit(make_train_step(cfg, opt, steps, batch_size))
    print(f"demo: TRM hidden={cfg.hidden_size} H_cycles={cfg.H_cycles} L_cycles={cfg.L_cycles} "
          f"on a toy reversal task, {steps} steps of batch {batch_size}")
    start = time.time()
    for i in range(steps):
        data_key, rng = jax.random.split(jax.random.fold_in(key, i + 1))
        state, loss, m = step_fn(state, toy_batch(data_key), rng)
        if (i + 1) % max(1, steps // 10) == 0 or i == 0:
            count = max(int(m["count"]), 1)
            print(f"step {i + 1:4d}  loss/row {float(loss) / batch_size:7.4f}  "
                  f"token acc {float(m['accuracy']) / count:6.3f}  exact {float(m['exact_accuracy']) / count:6.3f}"
                  f"  ({time.time() - start:5.1f}s)", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kellen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from kellen.data.cli import add_parser as add_data_parser

    add_data_parser(sub)

    p = sub.add_parser("parity", help="replay reference-TRM fixtures and check our outputs match")
    p.add_argument("fixtures", nargs="+", metavar="FIXTURE.npz")
    p.set_defaults(fn=cmd_parity)

    p = sub.add_parser("import-torch", help="convert a reference pretrain.py state_dict to our weights")
    p.add_argument("ckpt", metavar="CKPT", help="torch.save state_dict (needs the torch extra) or .npz")
    p.add_argument("out", metavar="OUT", help="output directory (must not exist)")
    p.add_argument("--arch", action="append", metavar="KEY=VALUE",
                   help="arch fields the tensors do not pin down (num_heads, H_cycles, ...)")
    p.set_defaults(fn=cmd_import_torch)

    p = sub.add_parser("demo", help="train a small TRM on a toy task (no TPU, GCS or W&B needed)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_demo)

    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        name = " ".join(filter(None, [args.command, getattr(args, "data_command", None)]))
        print(f"kellen {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
