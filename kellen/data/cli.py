"""`kellen data sudoku|maze|info`: build puzzle datasets (from CSVs or generated) and inspect them."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np

from kellen.data import build, format as fmt


def _sources(args, tmp: str, kind: str):
    """(train.csv, test.csv) paths: given, found in a --csv directory, or generated into tmp/source."""
    generate = args.generate is not None  # --generate 0 is a bad number, not a missing flag
    if args.csv and generate:
        raise fmt.DataError("give one of --csv and --generate, not both")
    if not args.csv and not generate:
        raise fmt.DataError("give --csv FILE|DIR or --generate N")
    if generate and args.generate < 1:
        raise fmt.DataError(f"--generate must be >= 1, got {args.generate}")
    if args.test_generate is not None and args.test_generate < 1:
        raise fmt.DataError(f"--test-generate must be >= 1, got {args.test_generate}")
    train = test = None
    for path in filter(None, (args.csv, args.test_csv)):
        if not os.path.exists(path):
            raise fmt.DataError(f"{path}: missing file")
    if args.csv:
        if os.path.isdir(args.csv):
            train, test = os.path.join(args.csv, "train.csv"), os.path.join(args.csv, "test.csv")
        else:
            train = args.csv
    test = args.test_csv or test
    test_n = args.test_generate
    if args.generate and test is None and test_n is None:
        test_n = max(1, args.generate // 10)
    if test is None and test_n is None:
        raise fmt.DataError(f"{args.csv}: no test set; give --test-csv FILE or --test-generate N")
    src = os.path.join(tmp, "source")
    os.makedirs(src, exist_ok=True)
    if args.generate:
        train = _generate(kind, args, args.generate, args.seed, os.path.join(src, "train.csv"))
    if test is None:
        test = _generate(kind, args, test_n, args.seed + 1, os.path.join(src, "test.csv"))
    return train, test


def _generate(kind, args, n, seed, path):
    if n < 1:
        raise fmt.DataError(f"--generate/--test-generate must be >= 1, got {n}")
    if kind == "sudoku":
        from kellen.data.sudoku_gen import generate_sudoku, write_sudoku_csv
        write_sudoku_csv(path, generate_sudoku(n, seed=seed, min_clues=args.min_clues))
    else:
        from kellen.data.maze_gen import generate_mazes, write_maze_csv
        write_maze_csv(path, generate_mazes(n, seed=seed, size=args.size, min_path_len=args.min_path_len,
                                            loop_prob=args.loop_prob))
    return path


def cmd_build(args) -> int:
    import tempfile

    from kellen.data import maze, sudoku

    kind = args.data_command
    build.check_output(args.out, args.force)  # before generating anything
    if args.subsample_size is not None and args.subsample_size < 1:
        raise fmt.DataError(f"--subsample-size must be >= 1, got {args.subsample_size}")
    if kind == "sudoku" and args.num_aug < 0:
        raise fmt.DataError(f"--num-aug must be >= 0, got {args.num_aug}")
    with tempfile.TemporaryDirectory() as scratch:
        train_csv, test_csv = _sources(args, scratch, kind)
        rng = np.random.default_rng(args.seed)
        if kind == "sudoku":
            q, a = sudoku.read_csv(train_csv, args.min_difficulty)
            tq, ta = sudoku.read_csv(test_csv, args.min_difficulty)
            q, a = build.subsample(q, a, args.subsample_size, rng)
            splits = {"train": sudoku.build_split(q, a, args.num_aug, rng),
                      "test": sudoku.build_split(tq, ta, 0, rng)}
        else:
            q, a = maze.read_csv(train_csv)
            tq, ta = maze.read_csv(test_csv)
            if tq.shape[1:] != q.shape[1:]:
                raise fmt.DataError(f"{test_csv}: mazes are {tq.shape[1]}x{tq.shape[2]} but {train_csv} "
                                    f"has {q.shape[1]}x{q.shape[2]}")
            q, a = build.subsample(q, a, args.subsample_size, rng)
            splits = {"train": maze.build_split(q, a, args.aug), "test": maze.build_split(tq, ta, False)}
        info = {**{k: v for k, v in vars(args).items() if k not in ("fn", "command", "data_command", "out")},
                "kind": kind, "train_csv": os.path.abspath(train_csv) if args.csv else "generated",
                "test_csv": os.path.abspath(test_csv) if (args.csv or args.test_csv) else "generated"}
        with build.output_dir(args.out, args.force) as root:
            _fill(root, splits, info, scratch if args.generate or args.test_generate else None)
    print_info(args.out)
    return 0


def _fill(root, splits, info, scratch):

    for split, (meta, arrays) in splits.items():
        fmt.write_split(os.path.join(root, split), meta, arrays)
    fmt.write_identifiers(root, ["<blank>"])
    if scratch and os.path.isdir(os.path.join(scratch, "source")):
        shutil.copytree(os.path.join(scratch, "source"), os.path.join(root, "source"))
    with open(os.path.join(root, "build.json"), "w") as f:
        json.dump({**info, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f, indent=1)


def describe(root: str) -> str:
    """Metadata and counts of both splits, as text."""
    lines = [f"dataset {root}"]
    local = fmt.local_root(root)
    for split in fmt.SPLITS:
        s = fmt.load_split(local, split)
        lines.append(f"[{split}] " + json.dumps(s.meta.to_dict()))
        for p in s.sets.values():
            lo, hi = (int(p.inputs.min()), int(p.inputs.max())) if p.num_examples else (0, 0)
            lines.append(f"  set {p.name}: {p.num_groups} groups, {p.puzzle_indices.size - 1} puzzles, "
                         f"{p.num_examples} examples, inputs {p.inputs.dtype} {tuple(p.inputs.shape)} "
                         f"tokens {lo}..{hi}")
    info = os.path.join(local, "build.json")
    if os.path.isfile(info):
        with open(info) as f:
            b = json.load(f)
        lines.append("built: " + ", ".join(f"{k}={b[k]}" for k in sorted(b) if b[k] is not None and b[k] is not False))
    return "\n".join(lines)


def print_info(root: str) -> None:
    print(describe(root))


def cmd_info(args) -> int:
    print_info(args.root)
    return 0


def build_from_spec(out: str, spec) -> None:
    """Build a generated dataset from a config's `data_build` node (same path as the CLI)."""
    argv = [spec.kind, "--out", out, "--generate", str(spec.generate), "--test-generate", str(spec.test_generate),
            "--seed", str(spec.seed)]
    if spec.kind == "sudoku":
        argv += ["--num-aug", str(spec.num_aug), "--min-clues", str(spec.min_clues)]
    elif spec.kind == "maze":
        argv += ["--size", str(spec.size), "--min-path-len", str(spec.min_path_len)] + (["--aug"] if spec.aug else [])
    else:
        raise fmt.DataError(f"data_build.kind={spec.kind!r} must be sudoku or maze")
    parser = argparse.ArgumentParser(prog="kellen")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data"] + argv)
    args.fn(args)


def add_parser(sub) -> None:
    data = sub.add_parser("data", help="build or inspect puzzle datasets").add_subparsers(dest="data_command",
                                                                                         required=True)
    for kind in ("sudoku", "maze"):
        p = data.add_parser(kind, help=f"build a {kind} dataset in the reference layout",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--out", required=True, help="dataset root (local dir or gs://...); must not exist")
        p.add_argument("--csv", help="source,q,a,rating CSV for train, or a dir with train.csv and test.csv")
        p.add_argument("--test-csv", help="CSV for the test split")
        p.add_argument("--generate", type=int, metavar="N", help="generate N training puzzles instead of --csv")
        p.add_argument("--test-generate", type=int, metavar="N",
                       help="generate N test puzzles (default with --generate: N/10)")
        p.add_argument("--subsample-size", type=int, metavar="N", help="seeded random subset of the training puzzles")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--force", action="store_true", help="replace an existing dataset once the new one is built")
        if kind == "sudoku":
            p.add_argument("--num-aug", type=int, default=0, metavar="K", help="shuffled copies per training puzzle")
            p.add_argument("--min-difficulty", type=int, metavar="R", help="keep CSV rows with rating >= R")
            p.add_argument("--min-clues", type=int, default=17,
                           help="generator: stop removing clues at this count (higher = easier)")
        else:
            p.add_argument("--aug", action="store_true", help="add the 8 dihedral images of each training maze")
            p.add_argument("--size", type=int, default=30, help="generator: grid side")
            p.add_argument("--min-path-len", type=int, default=0, help="generator: shortest S-G path at least this")
            p.add_argument("--loop-prob", type=float, default=0.0, help="generator: chance to open extra walls")
        p.set_defaults(fn=cmd_build)
    p = data.add_parser("info", help="print a dataset's metadata and counts")
    p.add_argument("root", metavar="DIR", help="dataset root (local or gs://)")
    p.set_defaults(fn=cmd_info)
