"""Throughput of one jitted training step (one ACT supervision step) on Sudoku-shaped data.

Reports, per config: compile time (lower + compile of the jitted step), examples/s (median
over timed steps, each step blocked on), model FLOPs per step counted analytically
(`model_flops`), two cross-checks of that count (XLA's `compiled.cost_analysis()['flops']`
and a walk over the step's jaxpr that counts every `dot_general`, loop bodies multiplied by
their trip count), achieved FLOP/s, and MFU against a matmul peak measured on this device.

Usage:
  python bench/train_step.py --preset cpu          # the two issue-4 CPU configs (attention, mlp_t)
  python bench/train_step.py [--batch 64] [--hidden 128] [--heads 8] [--H-cycles 3] [--L-cycles 6]
      [--L-layers 2] [--mlp-t] [--dtype float32|bfloat16] [--optimizer adamw] [--seq-len 81]
      [--steps 10] [--warmup 2] [--xla-flags="--xla_cpu_..."] [--no-jaxpr-count]

XLA flags are also read from the XLA_FLAGS environment variable; `--xla-flags=...` (write it with
'=', since the value starts with '--') appends to it before jax is imported, which this script
does lazily.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

# Reference PyTorch TRM rates quoted in issue 4 ("mlp_t and attention ... 13.1 and 18.3
# examples/s, fp32, one ACT step with AdamW"), read in that order.
REFERENCE_EX_PER_S = {"mlp_t": 13.1, "attention": 18.3}
GOAL_RATIO = 1.3


# The analytic FLOP count lives in kellen (the training loop's perf/ metrics use it too); it
# imports nothing from jax, so XLA flags can still be set before jax loads.
from kellen.model.flops import block_flops, model_flops  # noqa: E402


# ----------------------------------------------------------------------------------------
# Cross-check: dot_general FLOPs in the traced step (jaxpr), loops multiplied out
# ----------------------------------------------------------------------------------------
def _subjaxprs(value):
    """Jaxpr objects inside an eqn param (ClosedJaxpr, Jaxpr, or tuples/lists of them)."""
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _subjaxprs(v)


def jaxpr_dot_flops(jaxpr, notes: list) -> int:
    """2*M*N*K*batch for every dot_general; scan bodies x length; cond = max branch."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, rc), (lb, _rb) = eqn.params["dimension_numbers"]
            ls, rs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            k = math.prod(ls[i] for i in lc)
            bt = math.prod(ls[i] for i in lb)
            m = math.prod(s for i, s in enumerate(ls) if i not in lc and i not in lb)
            n = math.prod(s for i, s in enumerate(rs) if i not in rc and i not in _rb)
            total += 2 * bt * m * n * k
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_dot_flops(eqn.params["jaxpr"].jaxpr, notes)
        elif name == "cond":
            total += max(jaxpr_dot_flops(br.jaxpr, notes) for br in eqn.params["branches"])
        elif name == "while":
            body = jaxpr_dot_flops(eqn.params["body_jaxpr"].jaxpr, notes)
            if body:
                notes.append("while loop with matmuls counted once (unknown trip count)")
            total += body
        else:
            for v in eqn.params.values():
                for sub in _subjaxprs(v):
                    total += jaxpr_dot_flops(sub, notes)
    return total


# ----------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------
def measure_matmul_peak(dtype_name: str, n: int = 2048, reps: int = 20) -> tuple:
    """(best, median) FLOP/s of a jitted n x n @ n x n matmul in `dtype_name` on the default device.

    The best rep is the peak estimate: on a shared machine other processes can only slow a
    rep down, never speed it up.
    """
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype_name)
    ka, kb = jax.random.split(jax.random.PRNGKey(1))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dt)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dt)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    mm(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times), 2 * n ** 3 / statistics.median(times)


@dataclass
class Result:
    name: str
    batch: int
    lower_s: float
    compile_s: float
    step_times: list
    cpu_times: list
    flops: dict
    xla_flops: float
    jaxpr_flops: int
    jaxpr_notes: list
    loss: float

    @property
    def step_s(self) -> float:
        return statistics.median(self.step_times)

    @property
    def ex_per_s(self) -> float:
        return self.batch / self.step_s

    @property
    def flop_per_s(self) -> float:
        return self.flops["total"] / self.step_s


def build_config(args, mlp_t: bool):
    from kellen.model.config import TRMConfig

    return TRMConfig(seq_len=args.seq_len, vocab_size=11, num_puzzle_identifiers=1,
                     H_cycles=args.H_cycles, L_cycles=args.L_cycles, L_layers=args.L_layers,
                     hidden_size=args.hidden, num_heads=args.heads, puzzle_emb_len=16,
                     pos_encodings="rope", mlp_t=mlp_t, forward_dtype=args.dtype)


def sudoku_batch(cfg, batch: int, seed: int = 0):
    """Random Sudoku-shaped batch: tokens 1 (blank) .. 10 (digit 9), labels 2..10, puzzle id 0."""
    import numpy as np
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    labels = rng.integers(2, cfg.vocab_size, size=(batch, cfg.seq_len), dtype=np.int32)
    blank = rng.random((batch, cfg.seq_len)) < 0.7
    inputs = np.where(blank, 1, labels).astype(np.int32)
    return {"inputs": jnp.asarray(inputs), "labels": jnp.asarray(labels),
            "puzzle_identifiers": jnp.zeros((batch,), jnp.int32)}


def run_config(name: str, cfg, args) -> Result:
    import jax

    from kellen.train.step import OptimConfig, init_train_state, make_train_step

    opt = OptimConfig(optimizer=args.optimizer, lr=1e-4, lr_warmup_steps=100)
    total_steps = 100_000
    batch = sudoku_batch(cfg, args.batch)
    state = init_train_state(cfg, opt, total_steps, jax.random.PRNGKey(0), batch)
    # initial_carry gives z_H and z_L the same buffer; copy every leaf so donation is legal.
    state = jax.tree.map(lambda x: x.copy(), state)
    train_step = make_train_step(cfg, opt, total_steps, args.batch)
    rng0 = jax.random.PRNGKey(1)

    jaxpr_flops, notes = 0, []
    if not args.no_jaxpr_count:
        closed = jax.make_jaxpr(train_step)(state, batch, rng0)
        jaxpr_flops = jaxpr_dot_flops(closed.jaxpr, notes)

    step = jax.jit(train_step, donate_argnums=0)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch, rng0)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()

    xla_flops = float("nan")
    try:
        ca = compiled.cost_analysis()
        if isinstance(ca, (list, tuple)):
            ca = ca[0] if ca else {}
        if ca and "flops" in ca:
            xla_flops = float(ca["flops"])
    except Exception as e:  # not every backend implements it
        notes.append(f"cost_analysis unavailable: {e!r}")

    times, cpu, loss = [], [], float("nan")
    for i in range(args.warmup + args.steps):
        rng = jax.random.fold_in(rng0, i)
        t, c = time.perf_counter(), time.process_time()
        state, loss_v, _metrics = compiled(state, batch, rng)
        jax.block_until_ready((state, loss_v))
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        loss = float(loss_v)
    return Result(name, args.batch, t1 - t0, t2 - t1, times, cpu, model_flops(cfg, args.batch),
                  xla_flops, jaxpr_flops, notes, loss)


def describe(cfg, args) -> str:
    return (f"B={args.batch} hidden={cfg.hidden_size} heads={cfg.num_heads} H{cfg.H_cycles}/L{cfg.L_cycles} "
            f"L_layers={cfg.L_layers} T={cfg.total_len} {'mlp_t' if cfg.mlp_t else 'attention+' + cfg.pos_encodings} "
            f"{cfg.forward_dtype} {args.optimizer}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=["cpu"], help="cpu: the two issue-4 configs (attention, mlp_t)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=8, help="attention heads (TRMConfig default 8)")
    ap.add_argument("--H-cycles", dest="H_cycles", type=int, default=3)
    ap.add_argument("--L-cycles", dest="L_cycles", type=int, default=6)
    ap.add_argument("--L-layers", dest="L_layers", type=int, default=2)
    ap.add_argument("--mlp-t", dest="mlp_t", action="store_true")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--optimizer", choices=["adamw", "adam_atan2", "adam", "lion"], default="adamw")
    ap.add_argument("--seq-len", dest="seq_len", type=int, default=81)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compile")
    ap.add_argument("--peak-n", type=int, default=2048, help="matmul size for the peak measurement")
    ap.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before jax is imported")
    ap.add_argument("--no-jaxpr-count", action="store_true", help="skip the jaxpr dot_general count")
    args = ap.parse_args(argv)

    if args.preset == "cpu":  # issue 4: B=64, hidden 128, H3/L6, 2 layers, fp32, AdamW, seq 81
        args.batch, args.hidden, args.H_cycles, args.L_cycles, args.L_layers = 64, 128, 3, 6, 2
        args.dtype, args.optimizer, args.seq_len = "float32", "adamw", 81
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    import jax

    dev = jax.devices()[0]
    print(f"jax {jax.__version__} backend={jax.default_backend()} device={dev.device_kind} "
          f"machine={platform.machine()} cpus={os.cpu_count()} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

    print(f"load average at start (1/5/15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())} "
          f"(other processes compete for the {os.cpu_count()} cores when this is above ~0.5)")
    peak_best, peak_med = measure_matmul_peak(args.dtype, args.peak_n)
    print(f"matmul {args.peak_n}x{args.peak_n} {args.dtype} before: best {peak_best / 1e9:.1f} GFLOP/s, "
          f"median {peak_med / 1e9:.1f} GFLOP/s (20 reps)")

    if args.preset == "cpu":
        configs = [("attention", build_config(args, False)), ("mlp_t", build_config(args, True))]
    else:
        configs = [("mlp_t" if args.mlp_t else "attention", build_config(args, args.mlp_t))]

    results = []
    for name, cfg in configs:
        print(f"\n== {name}: {describe(cfg, args)}")
        r = run_config(name, cfg, args)
        results.append(r)
        f = r.flops
        print(f"  compile: lower {r.lower_s:.2f}s + compile {r.compile_s:.2f}s = {r.lower_s + r.compile_s:.2f}s")
        print(f"  step times (s): {' '.join(f'{t:.3f}' for t in r.step_times)}  (loss {r.loss:.4g})")
        print(f"  process CPU s/step (all threads): median {statistics.median(r.cpu_times):.3f}  "
              f"[{os.cpu_count()} cores; uncontended wall >= CPU/{os.cpu_count()}]  load avg now {os.getloadavg()[0]:.2f}")
        print(f"  analytic model FLOPs/step: {f['total'] / 1e9:.2f} G (forward {f['forward'] / 1e9:.2f} G, "
              f"backward {f['backward'] / 1e9:.2f} G; per block {f['per_block'] / 1e9:.3f} G: "
              + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in f["block_terms"].items()) + ")")
        if r.jaxpr_flops:
            print(f"  jaxpr dot_general FLOPs/step: {r.jaxpr_flops / 1e9:.2f} G "
                  f"(ratio to analytic {r.jaxpr_flops / f['total']:.3f})")
        print(f"  XLA cost_analysis flops: {r.xla_flops / 1e9:.2f} G (ratio to analytic {r.xla_flops / f['total']:.3f}); "
              f"XLA walks each while-loop body once and adds elementwise ops: the analytic count with every "
              f"loop body taken once is {f['loop_bodies_once'] / 1e9:.2f} G "
              f"(XLA/that = {r.xla_flops / f['loop_bodies_once']:.3f})")
        for note in r.jaxpr_notes:
            print(f"  note: {note}")

    after_best, after_med = measure_matmul_peak(args.dtype, args.peak_n)
    print(f"\nmatmul {args.peak_n}x{args.peak_n} {args.dtype} after: best {after_best / 1e9:.1f} GFLOP/s, "
          f"median {after_med / 1e9:.1f} GFLOP/s (20 reps)")
    peak = max(peak_best, after_best)
    print(f"measured matmul peak (best rep before/after): {peak / 1e9:.1f} GFLOP/s; load average now "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")

    print("\nsummary (median step time; MFU = analytic FLOP/s / measured matmul peak):")
    for r in results:
        ref = REFERENCE_EX_PER_S.get(r.name) if args.preset == "cpu" else None
        ref_txt = (f" | reference {ref:.1f} ex/s -> {r.ex_per_s / ref:.2f}x "
                   f"({'meets' if r.ex_per_s / ref >= GOAL_RATIO else 'misses'} {GOAL_RATIO}x goal)") if ref else ""
        print(f"  {r.name:9s} B={r.batch} compile {r.lower_s + r.compile_s:6.2f}s | step {r.step_s * 1e3:7.1f} ms | "
              f"{r.ex_per_s:6.1f} ex/s | {r.flops['total'] / 1e9:7.2f} GFLOP/step | "
              f"{r.flop_per_s / 1e9:6.1f} GFLOP/s | MFU {100 * r.flop_per_s / peak:5.1f}% "
              f"of {peak / 1e9:.1f}{ref_txt}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
