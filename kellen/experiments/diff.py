"""`kellen diff RUN_A RUN_B`: what differs between two runs' records (config, overrides, git, versions).

    kellen diff exp03_a exp03_b                  # by run name: results/<group>/<run>, then runs/<group>/<run>
    kellen diff exp03_a exp03_a--epochs=10000    # a variant against its base
    kellen diff runs/demo/demo_a gs://bucket/runs/demo/demo_b --json

A run is a run dir (a local dir holding config.yaml, or a gs:// url) or a run name. A name is
looked up in <results>/<group>/<name> (downloaded records) first, then in
<output root>/<group>/<name>; group is the `group:` of configs/<config name>.yaml (the config
name is the part before `--`), else default_group(config name).

Only differing entries are shown. config.yaml is flattened to dotted keys (arch.hidden_size;
lists are single values). run_name, group, output_root and checkpoint_path differ between any
two runs and say where a run lives, not what it did, so they go in a separate `identity`
section listed last, and do not count as config differences. git (commit, dirty) and package
versions come from metadata.json; a key present on one side only shows as <missing>.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

import yaml

if __package__ in (None, ""):  # run as a script: make `kellen` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kellen.experiments import runs  # noqa: E402
from kellen.experiments.runs import RunError  # noqa: E402
from kellen.experiments.spec import flatten  # noqa: E402
from kellen.gcs import join  # noqa: E402
from kellen.cli import ArgumentParser  # noqa: E402

MISSING = "<missing>"
IDENTITY = ("run_name", "group", "output_root", "checkpoint_path")
SECTIONS = ("config", "overrides", "git", "versions", "identity")  # table order
GIT_KEYS = ("commit", "dirty")


def _read(path: str) -> Optional[str]:
    from kellen.experiments.status import _read as read  # local file or gs:// object; None if absent

    return read(path)


def check_run_name(name: str) -> str:
    """Run names are config names plus `--key=value` variants: [A-Za-z0-9_.=+-], not starting with '.'."""
    if not runs.is_run_name(name):
        raise RunError(f"invalid run name {name!r}: use only letters, digits and '_.-=+' "
                       f"(not starting with '.'), or give a run dir path")
    return name


def find_run_dir(ref: str, results_dir: str = "results", output_root: Optional[str] = None,
                 config_dir: Optional[str] = None) -> str:
    """The run dir `ref` means: a gs:// url or local run dir as given (absolute), else the run
    name looked up under results_dir, then the output root. Relative roots are relative to the
    repo root. Raises ValueError (RunError) with one line naming what was tried."""
    if ref.startswith("gs://"):
        return ref.rstrip("/")
    if "/" in ref or os.sep in ref or os.path.isfile(os.path.join(ref, "config.yaml")):
        # A path: never reinterpreted as a name, so `../x` cannot wander into other lookups.
        if not os.path.isfile(os.path.join(ref, "config.yaml")):
            raise RunError(f"{ref}: not a run dir (no config.yaml there)")
        return os.path.abspath(ref)
    check_run_name(ref)
    from kellen.train.run_record import default_group

    config_name = ref.split("--", 1)[0]
    path = runs.config_file(config_name, config_dir)  # check_name()s the config name too
    own = runs.read_config_yaml(path) if path else {}
    group = str(own.get("group") or default_group(config_name))
    runs.check_name(group, "group")  # the config's value reaches a path
    roots = [results_dir, output_root or str(own.get("output_root") or "runs")]
    tried = []
    for root in dict.fromkeys(roots):
        run_dir = runs.join_path(root, group, ref)
        try:
            if _read(join(run_dir, "config.yaml")) is not None:
                return run_dir
            tried.append(run_dir)
        except Exception as e:  # noqa: BLE001 -- storage clients raise many kinds; an unreachable
            # bucket is one more place it was not found, and the message says why
            tried.append(f"{run_dir} ({' '.join(str(e).split())})")
    raise RunError(f"no run {ref!r}: tried {', '.join(tried)}")


def _load(run_dir: str, name: str, parse, required: bool = False) -> Any:
    path = join(run_dir, name)
    try:
        text = _read(path)
    except OSError as e:
        raise RunError(f"{path}: unreadable: {' '.join(str(e).split())}") from None
    if text is None:
        if required:
            raise RunError(f"{path}: missing (not a run dir?)")
        return MISSING
    try:
        return parse(text)
    except (yaml.YAMLError, ValueError) as e:
        raise RunError(f"{path}: malformed: {' '.join(str(e).split())}") from None


def _same(a: Any, b: Any) -> bool:
    # Not ==: YAML's 1, 1.0 and true are equal in Python but are different settings.
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _changed(a: Dict[str, Any], b: Dict[str, Any], keys: Optional[List[str]] = None) -> Dict[str, Dict[str, Any]]:
    keys = keys if keys is not None else sorted(set(a) | set(b))
    pairs = {k: {"a": a.get(k, MISSING), "b": b.get(k, MISSING)} for k in keys}
    return {k: p for k, p in pairs.items() if not _same(p["a"], p["b"])}


def diff_runs(dir_a: str, dir_b: str) -> Dict[str, Any]:
    """{"a": dir_a, "b": dir_b, section: {key: {"a": value, "b": value}}} for the sections config,
    overrides (key "overrides.yaml": the whole lists), git, versions and identity, each holding
    only what differs (empty when nothing does). Values absent on one side are "<missing>"."""
    out: Dict[str, Any] = {"a": dir_a, "b": dir_b}
    cfg, over, meta = [], [], []
    for d in (dir_a, dir_b):
        body = _load(d, "config.yaml", yaml.safe_load, required=True)
        if not isinstance(body, dict):
            raise RunError(f"{join(d, 'config.yaml')}: not a YAML mapping")
        cfg.append(flatten(body))
        over.append(_load(d, "overrides.yaml", lambda t: yaml.safe_load(t) or []))
        m = _load(d, "metadata.json", json.loads)
        meta.append(m if isinstance(m, dict) else {})
    ident = [{k: c.pop(k) for k in IDENTITY if k in c} for c in cfg]
    out["config"] = _changed(*cfg)
    out["overrides"] = _changed({"overrides.yaml": over[0]}, {"overrides.yaml": over[1]})
    out["git"] = _changed(*[m.get("git") if isinstance(m.get("git"), dict) else {} for m in meta], list(GIT_KEYS))
    out["versions"] = _changed(*[m.get("versions") if isinstance(m.get("versions"), dict) else {} for m in meta])
    out["identity"] = _changed(*ident, list(IDENTITY))
    return out


def _cell(value: Any):
    from rich.text import Text

    if value == MISSING:
        return Text(MISSING, style="dim italic")
    if isinstance(value, str):
        return Text(value)  # Text, not a markup string: values like "[1, 2]" stay literal
    return Text(json.dumps(value, default=str))  # null, true, [..] as YAML/JSON would read them


def render(result: Dict[str, Any], console=None) -> None:
    """Print the diff as rich tables: a header naming both run dirs, then one table per section."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(soft_wrap=False)
    console.print(f"A: {result['a']}", markup=False, highlight=False)
    console.print(f"B: {result['b']}", markup=False, highlight=False)
    if not result["config"]:
        console.print("no config differences", highlight=False)
    for section in SECTIONS:
        if not result.get(section):
            continue
        table = Table(title=section, title_justify="left", show_lines=False)
        for col in ("key", "A", "B"):
            table.add_column(col, overflow="fold")
        for key, pair in result[section].items():
            table.add_row(_cell(key), _cell(pair["a"]), _cell(pair["b"]))
        console.print(table)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """`kellen diff RUN_A RUN_B ...`"""
    p = subparsers.add_parser("diff", help="what differs between two runs (config, overrides, git, versions)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a", metavar="RUN_A", help="run name, run dir or gs:// url")
    p.add_argument("run_b", metavar="RUN_B", help="run name, run dir or gs:// url")
    p.add_argument("--results", default=None, metavar="DIR",
                   help="downloaded run records, searched first (default: the repo's results/)")
    p.add_argument("--output-root", default=None, metavar="ROOT",
                   help="where runs write their records (default: the config's output_root, else runs/)")
    p.add_argument("--config-dir", default=None, metavar="DIR",
                   help="extra dir of configs, to read a run's group from (as `kellen run`)")
    p.add_argument("--json", action="store_true", help="print the differences as JSON")
    p.set_defaults(fn=cmd_diff)
    return p


def cmd_diff(args) -> int:
    try:
        # As `kellen status`: roots given on the command line are relative to the cwd, defaults to the repo.
        results = args.results or "results"
        if args.results and not results.startswith("gs://"):
            results = os.path.abspath(results)
        root = args.output_root
        if root and not root.startswith("gs://"):
            root = os.path.abspath(root)
        dirs = [find_run_dir(r, results, root, getattr(args, "config_dir", None)) for r in (args.run_a, args.run_b)]
        result = diff_runs(*dirs)
    except (ValueError, OSError) as e:  # RunError is a ValueError; messages are one line
        print(f"kellen diff: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        render(result)
    return 0


if __name__ == "__main__":
    parser = ArgumentParser(prog="kellen")
    add_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["diff", *sys.argv[1:]])  # `python diff.py A B` means `kellen diff A B`
    sys.exit(ns.fn(ns))
