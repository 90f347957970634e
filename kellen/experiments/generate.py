"""`kellen generate` and `kellen list`: write one Hydra config per run from the group specs.

    kellen generate exp03 [exp04a ...] | --all [--force] [--check] [--spec-dir DIR] [--out DIR]
    kellen list [GROUP]

Each `configs/<run>.yaml` is a primary config (`--config-name <run>`) over cfg_pretrain:

    # Generated from configs/experiments/exp03.yaml (spec sha256 <12 hex>) by kellen generate exp03; ...
    # content-sha256: <sha256 of everything below these two lines>
    defaults:
    - cfg_pretrain
    - _self_
    <the run's overrides, sorted keys>

The content hash is how a hand edit is told from a stale file. Files without the header are never
overwritten; edited or foreign ones only with --force; stale ones are reported (removed with --force).
Every spec problem is reported before anything is written. Exit status: 0 ok, 1 `--check` found
changes, 2 errors (one line each on stderr).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from kellen.experiments.spec import (MAPPING_SUFFIX, GroupSpec, Problems, SpecError, display_path,
                                     find_spec_dir, load_many, name_problem, spec_files)

GENERATED = "# Generated from "
CONTENT = "# content-sha256: "
_GROUP_RE = re.compile(r" by kellen generate (\S+?);")


_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_./@+-]*(?::[A-Za-z0-9_./@+-]+)*$")
_RESERVED = {w for w in "y n yes no true false on off null".split()}


def _scalar(v) -> str:
    if v is None or isinstance(v, bool):
        return {None: "null", True: "true", False: "false"}[v]
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):  # as PyYAML writes floats: 1.0e-05, .inf; read back exactly
        if v != v or v in (float("inf"), float("-inf")):
            return ".nan" if v != v else (".inf" if v > 0 else "-.inf")
        text = repr(v).lower()
        return text.replace("e", ".0e") if "." not in text and "e" in text else text
    v = str(v)
    return v if _PLAIN.match(v) and v.lower() not in _RESERVED else json.dumps(v)  # JSON strings are YAML


def dump(data, sort_keys: bool = True, indent: str = "") -> str:
    """Block YAML for plain data (dicts, lists, scalars), like yaml.dump(default_flow_style=False)
    but ~40x faster: PyYAML's representer cost ~1 ms a run. Strings that could read as anything
    else are double-quoted."""
    out = []
    if isinstance(data, dict):
        for key in (sorted(data, key=str) if sort_keys else data):
            value = data[key]
            if isinstance(value, (dict, list)) and value:
                sub = indent + "  " if isinstance(value, dict) else indent
                out.append(f"{indent}{_scalar(key)}:\n{dump(value, sort_keys, sub)}")
            else:
                out.append(f"{indent}{_scalar(key)}: {_empty(value)}\n")
    else:
        for value in data:
            if isinstance(value, (dict, list)) and value:
                text = dump(value, sort_keys, indent + "  ")
                out.append(f"{indent}- {text[len(indent) + 2:]}")
            else:
                out.append(f"{indent}- {_empty(value)}\n")
    return "".join(out)


def _empty(value) -> str:
    return "{}" if value == {} else "[]" if value == [] else _scalar(value)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _with_header(group: GroupSpec, body: str, out_dir: str) -> str:
    spec = os.path.relpath(os.path.abspath(group.path), os.path.dirname(os.path.abspath(out_dir)))
    spec = display_path(group.path) if spec.startswith("..") else spec
    return (f"{GENERATED}{spec} (spec sha256 {group.sha256[:12]}) by kellen generate {group.id}; "
            f"do not edit: change the spec and regenerate.\n{CONTENT}{_sha(body)}\n{body}")


def render_run(group: GroupSpec, run, out_dir: str = "configs") -> str:
    """The generated file's text for one run."""
    return _with_header(group, "defaults:\n- cfg_pretrain\n- _self_\n" + dump(run.config), out_dir)


def render_mapping(group: GroupSpec, out_dir: str = "configs") -> str:
    """<id>.run_mapping.yaml: run -> values, notes, baseline, config, checkpoint_path, data_path."""
    runs = {r.name: {"values": r.values, "notes": r.notes, "baseline": r.baseline,
                     "config": f"{os.path.basename(os.path.abspath(out_dir))}/{r.name}.yaml",
                     "checkpoint_path": group.checkpoint_dir(r.name),
                     "data_path": r.data_path or (r.config.get("data_paths") or [None])[0]} for r in group.runs}
    head = {"group": group.id, "spec_sha256": group.sha256, "variables": group.variables,
            "baseline": group.baseline_run.name if group.baseline_run else None}
    body = dump(dict(head, runs=runs), sort_keys=False)
    return _with_header(group, body, out_dir)


def _body(text: str) -> str:
    return text.split("\n", 2)[2]


def read_generated(path: str):
    """(text, group id or None, edited) of an existing file; group None: not generated by us."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.startswith(GENERATED):
        return text, None, False
    first, _, rest = text.partition("\n")
    second, _, body = rest.partition("\n")
    m = _GROUP_RE.search(first)
    edited = not second.startswith(CONTENT) or second[len(CONTENT):].strip() != _sha(body)
    return text, (m.group(1) if m else ""), edited


def _generated_head(path: str) -> Optional[str]:
    """The group id in a file's header (None: not a generated file). Reads only the first line."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline(2000)
    except OSError:
        return None
    m = _GROUP_RE.search(first) if first.startswith(GENERATED) else None
    return m.group(1) if m else None


def write_atomic(path: str, text: str) -> None:
    """Write beside the target, then rename over it: readers see the old or the new file."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------ Hydra check
def _flat(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def hydra_check(candidates: Dict[str, tuple], configs_dir: str, skip=()) -> Dict[str, tuple]:
    """Compose each candidate {name: (text, overrides)} with Hydra as `--config-name <name>` would,
    beside a copy (symlinks) of configs_dir less `skip`; {name: (config key or None, what went wrong)}
    for those that fail or compose to other values."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from kellen.train.config import check_known_keys, register

    register()
    errors = {}
    with tempfile.TemporaryDirectory(prefix="kellen-generate-") as tmp:
        for entry in os.listdir(configs_dir):
            if entry[:-5] not in candidates and entry not in skip and not entry.startswith("."):
                os.symlink(os.path.abspath(os.path.join(configs_dir, entry)), os.path.join(tmp, entry))
        for name, (text, _) in candidates.items():
            with open(os.path.join(tmp, name + ".yaml"), "w", encoding="utf-8") as f:
                f.write(text)
        with initialize_config_dir(version_base="1.3", config_dir=tmp, job_name="kellen_generate"):
            for name, (_, overrides) in candidates.items():
                try:
                    cfg = compose(config_name=name)
                    check_known_keys(cfg)
                    OmegaConf.to_object(cfg)  # types and interpolations resolve
                    for path, want in _flat(overrides):
                        got = OmegaConf.select(cfg, path)
                        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
                        if got != want and not (isinstance(want, str) and "${" in want):
                            raise ValueError(f"{path} composes to {got!r}, not {want!r}")
                except Exception as e:  # anything Hydra or OmegaConf says, on one line
                    msg = " ".join(str(e).split("\n    full_key:")[0].split()) or type(e).__name__
                    errors[name] = (getattr(e, "full_key", None), msg)
    return errors


# -------------------------------------------------------------------------------------- generation
@dataclass
class GenerateReport:
    written: List[str] = field(default_factory=list)  # written (with check: would be)
    unchanged: List[str] = field(default_factory=list)
    stale: List[str] = field(default_factory=list)  # generated files no spec run makes any more
    removed: List[str] = field(default_factory=list)  # stale files removed (force)
    errors: List[str] = field(default_factory=list)  # files left alone: hand edits, not ours
    groups: Dict[str, int] = field(default_factory=dict)  # group -> runs
    check: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.written or self.removed or (self.check and self.stale))

    def lines(self) -> List[str]:
        verb = "would write" if self.check else "wrote"
        out = [f"{verb} {display_path(p)}" for p in self.written]
        out += [f"{'would remove' if self.check else 'removed'} {display_path(p)}" for p in self.removed]
        out += [f"stale (not in its spec any more; --force removes it): {display_path(p)}" for p in self.stale
                if p not in self.removed]
        out.append(f"{len(self.groups)} groups, {sum(self.groups.values())} runs: {len(self.written)} "
                   f"{'to write' if self.check else 'written'}, {len(self.unchanged)} unchanged")
        return out


def _load(group_ids: Optional[Sequence[str]], spec_dir: str) -> Dict[str, GroupSpec]:
    problems = Problems()
    if group_ids is None:
        if not os.path.isdir(spec_dir):
            raise SpecError(f"{display_path(spec_dir)}: no such spec folder")
        paths = spec_files(spec_dir)
    else:
        for g in group_ids:  # a group id is a file name in spec_dir, never a path out of it
            if name_problem(g):
                raise SpecError(f"invalid group id {g!r}: it {name_problem(g)}")
        paths = [os.path.join(spec_dir, g + ".yaml") for g in group_ids]
        for p in paths:
            if not os.path.isfile(p) or os.path.basename(p).startswith("_"):
                problems.add(p, "", "a base for `extends`, not a group" if os.path.isfile(p) else "no such spec")
        paths = [p for p in paths if os.path.isfile(p) and not os.path.basename(p).startswith("_")]
    groups = load_many(paths, spec_dir, problems)
    problems.raise_if_any()
    return groups


def generate(group_ids: Optional[Sequence[str]] = None, spec_dir: Optional[str] = None,
             out_dir: Optional[str] = None, force: bool = False, check: bool = False) -> GenerateReport:
    """Write configs/<run>.yaml for every run of these groups (None: all) and each group's run mapping.
    SpecError (nothing written) lists every spec problem; the report lists files and file problems."""
    spec_dir = spec_dir or find_spec_dir()
    out_dir = out_dir or os.path.dirname(os.path.abspath(spec_dir))
    groups = _load(group_ids, spec_dir)
    report = GenerateReport(check=check, groups={g.id: len(g.runs) for g in groups.values()})
    texts = {gid: {os.path.join(out_dir, r.name + ".yaml"): render_run(g, r, out_dir) for r in g.runs}
             for gid, g in groups.items()}
    existing: Dict[str, List[str]] = {}  # generated files in out_dir, by group
    for entry in (os.listdir(out_dir) if os.path.isdir(out_dir) else []):
        gid = _generated_head(os.path.join(out_dir, entry)) if entry.endswith(".yaml") else None
        if gid is not None:
            existing.setdefault(gid, []).append(os.path.join(out_dir, entry))
    # The first run of each group through real Hydra, beside cfg_pretrain (out_dir's, else the repo's).
    base = out_dir if os.path.isfile(os.path.join(out_dir, "cfg_pretrain.yaml")) else \
        os.path.dirname(find_spec_dir(os.path.dirname(os.path.abspath(__file__))))
    first = {g.runs[0].name: (texts[gid][os.path.join(out_dir, g.runs[0].name + ".yaml")], g.runs[0].config)
             for gid, g in groups.items() if g.runs}
    problems = Problems()
    skip = {os.path.basename(p) for paths in existing.values() for p in paths}
    for name, (key, what) in hydra_check(first, base, skip).items():
        group = next(g for g in groups.values() if g.runs and g.runs[0].name == name)
        in_fixed = key and any(k == key for k, _ in _flat(group.fixed))
        problems.add(group.path, f"fixed.{key}" if in_fixed else f"{name}: {key}" if key else name,
                     f"Hydra cannot load the generated config {name}.yaml: {what}")
    problems.raise_if_any()
    if group_ids is None:  # groups whose spec is gone: all their files are stale
        report.stale += sorted(p for gid, paths in existing.items() if gid not in groups for p in paths)
    for gid, group in groups.items():
        files = dict(texts[gid])
        files[os.path.join(spec_dir, f"{gid}{MAPPING_SUFFIX}.yaml")] = render_mapping(group, out_dir)
        todo, errors = [], []
        for path, text in files.items():
            if not os.path.exists(path):
                todo.append(path)
                continue
            old, owner, edited = read_generated(path)
            # A new spec sha alone (a note changed) leaves the file as it is: no churn in 1,000 files.
            if old == text or (owner == gid and not edited and _body(old) == _body(text)):
                report.unchanged.append(path)
            elif owner is None:
                errors.append(f"{display_path(path)}: not a generated file (no '{GENERATED.strip('# ')}' header); "
                              f"refusing to overwrite it (rename the run or move the file)")
            elif not force and edited:
                errors.append(f"{display_path(path)}: edited by hand (its content no longer matches its "
                              f"content-sha256); change the spec instead, or --force to overwrite")
            elif not force and owner != gid:
                errors.append(f"{display_path(path)}: generated from group {owner!r}, not {gid!r}; "
                              "--force to overwrite")
            else:
                todo.append(path)
        if errors:
            report.errors += errors + [f"{display_path(group.path)}: nothing written for group {gid}"]
            continue
        stale = sorted(set(existing.get(gid, [])) - set(files))
        report.stale += stale
        report.written += todo
        if not check:
            for path in todo:
                write_atomic(path, files[path])
    if force:
        report.removed = list(report.stale)
        if not check:
            for path in report.stale:
                os.unlink(path)
    return report


# ----------------------------------------------------------------------------------------- the CLI
def _table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def list_text(groups: Dict[str, GroupSpec], group_id: Optional[str] = None) -> str:
    """Groups with run counts; or one group's runs with their values, `*` marking the baseline."""
    if group_id is None:
        rows = [["group", "runs", "baseline", "name"]]
        rows += [[g.id, str(len(g.runs)), g.baseline_run.name if g.baseline_run else "-", g.name]
                 for g in sorted(groups.values(), key=lambda g: g.id)]
        return _table(rows)
    group = groups[group_id]
    cols = list(dict.fromkeys(group.variables + list(group.derived or [])
                              + [k for r in group.runs for k in r.values]))
    rows = [["run", "base"] + cols + ["notes"]]
    rows += [[r.name, "*" if r.baseline else ""] + [_fmt(r.values.get(c)) for c in cols] + [r.notes]
             for r in group.runs]
    return _table(rows)


def _reporting(fn):
    """Spec and file problems go to stderr, one line each, exit 2 (however the command is wired)."""
    def run(args) -> int:
        try:
            return fn(args)
        except SpecError as e:
            for line in e.problems:
                print(line, file=sys.stderr)
            return 2
        except OSError as e:
            print(f"kellen {args.command}: error: {e}", file=sys.stderr)
            return 2
    return run


@_reporting
def cmd_generate(args) -> int:
    if not args.groups and not args.all:
        raise SpecError("kellen generate: give group ids (kellen generate exp03) or --all")
    report = generate(None if args.all else args.groups, args.spec_dir, args.out, force=args.force, check=args.check)
    print("\n".join(report.lines()))
    for line in report.errors:
        print(line, file=sys.stderr)
    return 2 if report.errors else 1 if (args.check and report.changed) else 0


@_reporting
def cmd_list(args) -> int:
    groups = _load([args.group] if args.group else None, args.spec_dir or find_spec_dir())
    print(list_text(groups, args.group))
    return 0


def add_parser(sub) -> None:
    """Register `generate` and `list` on a subparsers object (kellen/cli.py)."""
    p = sub.add_parser("generate", help="write configs/<run>.yaml for the runs of experiment group specs")
    p.add_argument("groups", nargs="*", metavar="GROUP", help="group ids (configs/experiments/<id>.yaml)")
    p.add_argument("--all", action="store_true", help="every group spec")
    p.add_argument("--force", action="store_true", help="overwrite hand-edited files; remove stale ones")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if anything would change")
    p.add_argument("--spec-dir", help="spec folder (default: the repo's configs/experiments)")
    p.add_argument("--out", help="config folder to write (default: the spec folder's parent, configs/)")
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("list", help="experiment groups and their runs")
    p.add_argument("group", nargs="?", metavar="GROUP", help="show this group's runs")
    p.add_argument("--spec-dir", help="spec folder (default: the repo's configs/experiments)")
    p.set_defaults(fn=cmd_list)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from kellen.cli import ArgumentParser

    parser = ArgumentParser(prog="kellen", description=__doc__.split("\n")[0])
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
