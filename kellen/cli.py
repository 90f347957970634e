"""The `kellen` command: data, experiment groups (generate, list, guide), runs (batch, run, status),
results (results download, compare, diff), parity, import-torch."""
from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (exit 2) instead of usage + error;
    its subcommand parsers are of this class too."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


def main(argv=None) -> int:
    parser = ArgumentParser(prog="kellen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from kellen.data.cli import add_parser as add_data_parser

    add_data_parser(sub)
    # Experiment groups and runs; each module registers its own subcommands.
    from kellen.experiments import (compare, diff, generate, guide, results_download, run_experiment,
                                    run_experiment_batch, status_cli)

    generate.add_parser(sub)  # generate, list
    guide.add_parser(sub)
    run_experiment_batch.add_parser(sub)  # batch
    run_experiment.add_parser(sub)  # run
    status_cli.add_parser(sub)  # status
    results_download.add_parser(sub)  # results download
    compare.add_parser(sub)
    diff.add_parser(sub)

    p = sub.add_parser("parity", help="replay reference-TRM fixtures and check our outputs match")
    p.add_argument("fixtures", nargs="+", metavar="FIXTURE.npz")
    p.set_defaults(fn=cmd_parity)

    p = sub.add_parser("import-torch", help="convert a reference pretrain.py state_dict to our weights")
    p.add_argument("ckpt", metavar="CKPT", help="torch.save state_dict (needs the torch extra) or .npz")
    p.add_argument("out", metavar="OUT", help="output directory (must not exist)")
    p.add_argument("--arch", action="append", metavar="KEY=VALUE",
                   help="arch fields the tensors do not pin down (num_heads, H_cycles, ...)")
    p.set_defaults(fn=cmd_import_torch)

    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        name = " ".join(filter(None, [args.command, getattr(args, "data_command", None)]))
        print(f"kellen {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
