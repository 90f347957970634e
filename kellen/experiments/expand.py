"""Spec -> runs: grid x zip (+ explicit runs), names, derived values, the data prerequisite, and
each run's config overrides checked against the schema (`kellen.train.config.PretrainConfig`).

Checks are per (config path, value) and cached: a 1,000-run grid has few distinct values, and one
OmegaConf merge per run would cost ~12 ms each. Problems are added to a `spec.Problems`.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import hashlib
import itertools
import json
import math
import os
import typing
from typing import Any, Dict, List, Optional, Tuple

from kellen.experiments.spec import NAME_RE, GroupSpec, Problems, RunSpec, deep_merge, name_problem
from kellen.train.config import PretrainConfig

# ------------------------------------------------------------------------------- schema checks


@functools.lru_cache(maxsize=None)
def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_of(tp) -> Optional[type]:
    """The dataclass of a field typed X or Optional[X]."""
    if dataclasses.is_dataclass(tp):
        return tp
    return next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), None)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp).replace("typing.", "")


_NODES: Dict[type, Any] = {}
_LEAF_CACHE: Dict[Tuple, Optional[str]] = {}


def _leaf_error(cls, key: str, value) -> Optional[str]:
    """What OmegaConf says when `value` is assigned to cls.key (None: it takes it)."""
    tp = _hints(cls)[key]
    if isinstance(value, str) and tp in (str, Optional[str]):
        return None  # the common case (names, paths), without OmegaConf
    cache_key = (cls, key, type(value), repr(value))
    if cache_key not in _LEAF_CACHE:
        from omegaconf import OmegaConf

        node = _NODES.get(cls)
        if node is None:
            node = _NODES[cls] = OmegaConf.structured(cls)
        try:
            setattr(node, key, tree_copy(value))
            _LEAF_CACHE[cache_key] = None
        except Exception as e:  # OmegaConf's ValidationError and friends; the first line says it
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _LEAF_CACHE[cache_key] = f"wrong type ({cls.__name__}.{key} is {_type_name(tp)}): {msg}"
    return _LEAF_CACHE[cache_key]


def _unknown(cls, key) -> str:
    close = difflib.get_close_matches(str(key), _hints(cls), n=1)
    return f"not a config key ({cls.__name__} has no {key!r}" + (f"; did you mean {close[0]!r}?)" if close else ")")


def check_tree(tree: dict, cls=PretrainConfig, prefix: str = "") -> List[Tuple[str, str]]:
    """(dotted path, what) for each unknown key or wrong-typed value of nested overrides."""
    out = []
    for key, value in tree.items():
        sub = _dataclass_of(_hints(cls)[key]) if key in _hints(cls) else None
        if key not in _hints(cls):
            out.append((f"{prefix}{key}", _unknown(cls, key)))
        elif sub is not None and isinstance(value, dict):
            out += check_tree(value, sub, f"{prefix}{key}.")
        elif err := _leaf_error(cls, key, value):
            out.append((f"{prefix}{key}", err))
    return out


def tree_copy(x):
    """A copy of nested dicts and lists (scalars shared): copy.deepcopy is 10x slower here."""
    return {k: tree_copy(v) for k, v in x.items()} if isinstance(x, dict) else \
        [tree_copy(v) for v in x] if isinstance(x, list) else x


def nest(path: str, value) -> dict:
    """"arch.L_layers", 2 -> {"arch": {"L_layers": 2}}."""
    for part in reversed(path.split(".")):
        value = {part: value}
    return value


def _set(tree: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for part in parents:
        if not isinstance(tree.get(part), dict):
            tree[part] = {}
        tree = tree[part]
    tree[last] = deep_merge(tree[last], value) if isinstance(value, dict) and isinstance(tree.get(last), dict) \
        else value


def _lookup(tree: dict, path: str):
    for part in path.split("."):
        if not isinstance(tree, dict) or part not in tree:
            raise KeyError(path)
        tree = tree[part]
    return tree


def path_error(path: str) -> Optional[str]:
    """Why a dotted path is not a schema key (None: it is)."""
    cls = PretrainConfig
    for part in path.split("."):
        if cls is None:  # inside a mapping field (mesh.axes): any key
            return None
        if part not in _hints(cls):
            return _unknown(cls, part)
        cls = _dataclass_of(_hints(cls)[part])
    return None


def schema_default(path: str):
    """The schema's default at a dotted path (KeyError if there is none)."""
    node, cls = PretrainConfig(), PretrainConfig
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node, cls = node[part], None
            continue
        if cls is None or part not in _hints(cls):
            raise KeyError(path)
        node, cls = getattr(node, part), _dataclass_of(_hints(cls)[part])
        if node is None and cls is not None:  # e.g. data_build: None -> DataBuildConfig's defaults
            node = cls()
    return node


# ---------------------------------------------------------------------------------- derived values
_FUNCS = {"sqrt": math.sqrt, "log": math.log, "log2": math.log2, "exp": math.exp, "min": min, "max": max,
          "round": round, "int": int, "float": float, "abs": abs, "ceil": math.ceil, "floor": math.floor}
_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
           ast.Pow: lambda a, b: a ** b}


def _dotted(node) -> Optional[str]:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


def compile_expr(text: str) -> Tuple[ast.AST, List[str]]:
    """Parse and vet a derived expression; returns (tree, names used). ValueError says what is wrong."""
    try:
        tree = ast.parse(str(text).strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"cannot parse {text!r}: {e.msg}") from None
    names = []

    def vet(node):
        if isinstance(node, ast.Expression):
            return vet(node.body)
        if isinstance(node, ast.Constant):
            if type(node.value) not in (int, float):
                raise ValueError(f"only numbers are allowed, not {node.value!r}")
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            vet(node.left), vet(node.right)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            vet(node.operand)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS \
                and not node.keywords:
            [vet(a) for a in node.args]
        elif isinstance(node, (ast.Name, ast.Attribute)):
            name = _dotted(node)
            if name is None:
                raise ValueError("attribute access is only allowed on config paths (like arch.hidden_size)")
            if name in _FUNCS:
                raise ValueError(f"{name} is a function; call it")
            names.append(name)
        else:
            raise ValueError(f"{type(node).__name__} is not allowed (numbers, + - * / // % **, config paths and "
                             f"{', '.join(_FUNCS)} only)")

    vet(tree)
    return tree, names


def evaluate(tree: ast.AST, lookup) -> float:
    """Evaluate a vetted expression; lookup(dotted name) gives a number. ValueError on failure."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(b) > 256:
                raise ValueError(f"exponent {b} is too large")
            return _BINOPS[type(node.op)](a, b)
        if isinstance(node, ast.UnaryOp):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        if isinstance(node, ast.Call):
            return _FUNCS[node.func.id](*[ev(a) for a in node.args])
        name = _dotted(node)
        value = lookup(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} is {value!r}, not a number")
        return value

    try:
        out = ev(tree)
        if not isinstance(out, (int, float)) or isinstance(out, bool) or not math.isfinite(out):
            raise ValueError(f"the result {out!r} is not a finite number")  # e.g. (-1) ** 0.5
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    except (OverflowError, TypeError, ValueError) as e:
        raise ValueError(str(e)) from None
    return out


# ---------------------------------------------------------------------------------------- data
DATA_KEYS = {"kind": str, "csv": str, "test_csv": str, "generate": int, "test_generate": int,
             "subsample_size": int, "seed": int, "num_aug": int, "min_difficulty": int, "min_clues": int,
             "aug": bool, "size": int, "min_path_len": int, "loop_prob": float, "root": str}
_ONLY = {"sudoku": ("num_aug", "min_difficulty", "min_clues"), "maze": ("aug", "size", "min_path_len", "loop_prob")}
_GEN_DEFAULTS = {"sudoku": {"num_aug": 0, "min_clues": 17}, "maze": {"size": 30, "min_path_len": 0, "aug": False,
                                                                      "loop_prob": 0.0}}


def data_value_error(key: str, value) -> Optional[str]:
    want = DATA_KEYS.get(key)
    if want is None:
        return f"not a data key (known: {', '.join(DATA_KEYS)})"
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool)) or \
        (want is float and isinstance(value, int) and not isinstance(value, bool))
    return None if ok else f"expected {want.__name__}, got {type(value).__name__} {value!r}"


def resolve_data(data: dict) -> Tuple[dict, List[Tuple[str, str]]]:
    """The build parameters with the builder's defaults filled in, and (key, what) problems."""
    errs = [(f"data.{k}", e) for k, v in data.items() if (e := data_value_error(k, v))]
    p = {k: v for k, v in data.items() if k != "root"}
    kind = p.get("kind")
    if kind not in _ONLY:
        return p, errs + [("data.kind", f"{kind!r}: must be sudoku or maze")]
    if bool(p.get("csv")) == bool(p.get("generate")):
        errs.append(("data", "give one of csv and generate"))
    errs += [(f"data.{k}", f"only for {other} data") for other, keys in _ONLY.items() if other != kind
             for k in keys if k in p]
    p.setdefault("seed", 0)
    if kind == "sudoku":
        p.setdefault("num_aug", 0)
    if p.get("generate"):
        for k, v in _GEN_DEFAULTS[kind].items():
            p.setdefault(k, v)
        if isinstance(p["generate"], int):
            p.setdefault("test_generate", max(1, p["generate"] // 10))  # as `kellen data --generate`
    return p, errs


def data_dirname(p: dict) -> str:
    """A readable, deterministic name: sudoku-extreme-n1000-aug1000-s0, maze-gen500-t50-sz30-pl0-s0."""
    kind = p["kind"]
    if p.get("csv"):
        stem = os.path.splitext(os.path.basename(str(p["csv"]).rstrip("/")))[0]
        parts = [stem if stem.startswith(kind) else f"{kind}-{stem}"]
    else:
        parts = [f"{kind}-gen{p.get('generate')}"]
    tokens = [("test_generate", "t"), ("subsample_size", "n"), ("min_difficulty", "d"), ("min_clues", "mc"),
              ("size", "sz"), ("min_path_len", "pl"), ("loop_prob", "lp"), ("num_aug", "aug")]
    parts += [f"{t}{p[k]}" for k, t in tokens if p.get(k) is not None and not (k == "loop_prob" and not p[k])]
    if p.get("aug"):
        parts.append("aug")
    parts.append(f"s{p.get('seed', 0)}")
    name = "-".join(str(x) for x in parts)
    if p.get("test_csv"):  # not in the readable part: a hash keeps different sets apart
        name += "-" + hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:8]
    return "".join(c if NAME_RE.match(c) else "_" for c in name)


def data_build(path: str, p: dict) -> Optional[dict]:
    """The config's data_build block, when DataBuildConfig can say how to build this set."""
    if path.startswith("gs://") or not p.get("generate") or any(p.get(k) for k in (
            "csv", "test_csv", "subsample_size", "min_difficulty", "loop_prob")):
        return None
    keys = ("kind", "generate", "test_generate", "seed") + \
        (("num_aug", "min_clues") if p["kind"] == "sudoku" else ("size", "min_path_len", "aug"))
    return {k: p[k] for k in keys}


def data_prerequisites(group: GroupSpec) -> List[Tuple[str, dict]]:
    """The group's datasets, each once: (path, build parameters) in run order."""
    out: Dict[str, dict] = {}
    for run in group.runs:
        if run.data_path:
            out.setdefault(run.data_path, resolve_data(run.data)[0])
    return list(out.items())


def data_build_argv(path: str, params: dict) -> List[str]:
    """`kellen data ...` arguments that build this prerequisite."""
    argv = ["data", params["kind"], "--out", path]
    for key, value in params.items():
        if key not in ("kind", "root") and value is not None and value is not False:
            argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return argv


# -------------------------------------------------------------------------------------- expansion
def letters(i: int) -> str:
    """0 -> a, 25 -> z, 26 -> aa, ..."""
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(97 + r) + s
    return s


_SET_BY = {"group": None, "run_name": None, "project_name": "wandb_project", "wandb.project": "wandb_project",
           "checkpoint_path": "storage_root", "output_root": "output_root", "data_paths": "data",
           "data_build": "data"}


def _conflict(path: str, sources) -> Optional[str]:
    """Keys the generator sets itself may not be set by hand too. `sources`: the spec (or the one
    spec file, for `fixed`: a base's data_paths is the default that a group's `data` replaces)."""
    get = sources.get if isinstance(sources, dict) else lambda k: getattr(sources, k)
    for key, source in _SET_BY.items():
        if path == key or path.startswith(key + "."):
            if source is None:
                return "set by the generator (the group id and the run name)"
            if get(source):
                return f"set by the spec's `{source}`; give one of them"
    return None


def _check_variable(add, group, path, values: list, prefix: str) -> bool:
    """A variable's path and each of its values against the schema (or the data keys)."""
    if not isinstance(path, str) or not all(path.split(".")):
        add(f"{prefix}{path}", "not a dotted config path")
        return False
    if path.startswith("data."):
        errs = [(path, e) for v in values if (e := data_value_error(path[5:], v))]
    else:
        conflict = _conflict(path, group)
        errs = [(path, conflict)] if conflict else [e for v in values for e in check_tree(nest(path, v))]
    for key, what in errs:
        add(prefix + key, what)
    return not errs


def _check_fixed(problems: Problems, group: GroupSpec, chain) -> None:
    """Each layer's `fixed` and `data` in its own file, so a problem names the file that has it."""
    for path, raw, _ in chain:
        fixed = dict(raw.get("fixed") or {})
        fixed_data = fixed.pop("data", None) if isinstance(fixed.get("data"), dict) else None
        data = [(f"data.{k}", v) for k, v in (raw.get("data") or {}).items()] + \
            [(f"fixed.data.{k}", v) for k, v in (fixed_data or {}).items()]
        layer = dict(raw, data=raw.get("data") or fixed_data)
        errs = check_tree(fixed) + [(k, c) for k in fixed if (c := _conflict(k, layer))]
        for key, what in errs:
            problems.add(path, f"fixed.{key}", what)
        for key, value in data:
            if err := data_value_error(key.rsplit(".", 1)[1], value):
                problems.add(path, key, err)


def _entries(add, group: GroupSpec, variables: dict) -> List[dict]:
    """[{values, name?, notes?, baseline?, index?}] in run order: grid x zip, then explicit runs."""
    for key in set(variables) - {"grid", "zip", "runs"}:
        add(f"variables.{key}", "not grid, zip or runs")
    blocks = {}
    for section in ("grid", "zip"):
        block = variables.get(section) or {}
        if not isinstance(block, dict):
            add(f"variables.{section}", f"expected a mapping of path: [values], got {type(block).__name__}")
            block = {}
        for path, values in block.items():
            if not isinstance(values, list) or not values:
                add(f"variables.{section}.{path}", "expected a non-empty list of values")
        blocks[section] = {p: v for p, v in block.items() if isinstance(v, list) and v and
                           _check_variable(add, group, p, v, f"variables.{section}.")}
    grid, zipped = blocks["grid"], blocks["zip"]
    if len({len(v) for v in zipped.values()}) > 1:
        add("variables.zip", "lists of unequal length (" + ", ".join(f"{k}: {len(v)}" for k, v in zipped.items()) + ")")
        zipped = {}
    rows = [dict(zip(zipped, row)) for row in zip(*zipped.values())] if zipped else [{}]
    out = [{"values": {**dict(zip(grid, combo)), **row}} for combo in itertools.product(*grid.values())
           for row in rows] if grid or zipped else []
    explicit = variables.get("runs") or []
    if not isinstance(explicit, list):
        add("variables.runs", f"expected a list of runs, got {type(explicit).__name__}")
        explicit = []
    for i, run in enumerate(explicit):
        key = f"variables.runs[{i}]"
        if not isinstance(run, dict) or not isinstance(run.get("values") or {}, dict):
            add(key, "expected {name?, values: {path: value}, notes?, baseline?}")
            continue
        for k in set(run) - {"name", "values", "notes", "baseline"}:
            add(f"{key}.{k}", "not name, values, notes or baseline")
        values = {p: v for p, v in (run.get("values") or {}).items()
                  if _check_variable(add, group, p, [v], f"{key}.values.")}
        out.append(dict(run, values=values, index=i))
    if not any(variables.get(k) for k in ("grid", "zip", "runs")):
        add("variables", "empty grid (give variables.grid, variables.zip or variables.runs)")
    return out


def _names(add, gid: str, names: Optional[list], entries: List[dict]) -> List[str]:
    if names is not None and len(names) != len(entries):
        add("names", f"{len(names)} names for {len(entries)} runs")
        names = None
    out = []
    for i, e in enumerate(entries):
        name, key = (names[i], f"names[{i}]") if names else (f"{gid}_{letters(i)}", "id")
        if e.get("name") is not None:
            if names and e["name"] != names[i]:
                add(f"variables.runs[{e['index']}].name", f"{e['name']!r} but names[{i}] is {names[i]!r}")
            name, key = str(e["name"]), f"variables.runs[{e['index']}].name"
        problem = name_problem(name)
        if problem and not (key == "id" and name_problem(gid)):  # a bad id is reported once
            add(key, f"run name {name!r} {problem}")
        elif name in out:
            add(key, f"run name {name!r} appears twice")
        out.append(name)
    return out


def _derived(add, group: GroupSpec, derived: dict) -> Dict[str, ast.AST]:
    out = {}
    for target, expr in derived.items():
        key = f"derived.{target}"
        expr = repr(expr) if isinstance(expr, (int, float)) and not isinstance(expr, bool) else expr
        err = (not isinstance(expr, str) and "expected an expression string") or \
            (target in group.variables and "also a variable") or path_error(target) or _conflict(target, group)
        try:
            if err:
                raise ValueError(err)
            tree, names = compile_expr(expr)
            bad = [n for n in names if (n[5:] not in DATA_KEYS if n.startswith("data.") else path_error(n))]
            if bad:
                raise ValueError(f"unknown name {bad[0]!r} (not a config path or data.<key>)")
            out[target] = tree
        except ValueError as e:
            add(key, str(e))
    return out


def _baselines(add, entries, names, base, complete: bool) -> List[int]:
    out = [i for i, e in enumerate(entries) if e.get("baseline")]
    if complete and base is not None:
        idx = base if isinstance(base, int) else names.index(base) if base in names else None
        if idx is None or not 0 <= idx < len(entries):
            add("baseline", f"no run named {base!r}" if idx is None else
                f"index {base} is not in 0..{len(entries) - 1}")
        else:
            out = sorted(set(out) | {idx})
    if len(out) > 1:
        add("baseline", "more than one baseline: " + ", ".join(names[i] for i in out))
    return out


def expand_group(group: GroupSpec, merged: dict, chain, problems: Problems) -> bool:
    """Fill group.runs (and variables, data, fixed) from the merged spec, adding problems; False when
    the run list itself is wrong (checks by run name would only repeat that)."""
    def add(key, what):
        problems.add(group.path, key, what)

    fixed = dict(group.fixed)
    if isinstance(fixed.get("data"), dict):  # fixed.data.* are data parameters, not config keys
        group.data = deep_merge(group.data, fixed.pop("data"))
    group.fixed = fixed
    _check_fixed(problems, group, chain)
    before = len(problems.lines)
    entries = _entries(add, group, merged.get("variables") or {})
    group.variables = list(dict.fromkeys(p for e in entries for p in e["values"]))
    names = _names(add, group.id, merged.get("names"), entries)
    complete = len(problems.lines) == before
    derived = _derived(add, group, merged.get("derived") or {})
    baselines = _baselines(add, entries, names, merged.get("baseline"), complete)
    notes = merged.get("notes") or {}
    for name, note in notes.items():
        if (name not in names and complete) or not isinstance(note, str):
            add(f"notes.{name}", "no such run" if name not in names else
                f"expected a string, got {type(note).__name__}")
    failed = set()
    for i, (entry, name) in enumerate(zip(entries, names)):
        values, tree, data = dict(entry["values"]), tree_copy(fixed), dict(group.data)
        for path, value in values.items():
            if path.startswith("data."):
                data[path[5:]] = value
            else:
                _set(tree, path, tree_copy(value))
        params, data_path = {}, None
        if data:
            params, errs = resolve_data(data)
            for key, what in errs:
                add(key, what)
            tree.pop("data_paths", None), tree.pop("data_build", None)  # a base's data is replaced
            if not errs:
                data_path = f"{str(data.get('root', 'data')).rstrip('/')}/{data_dirname(params)}"
                tree["data_paths"] = [data_path]
                if build := data_build(data_path, params):
                    tree["data_build"] = build

        def lookup(n):  # the run's config so far, else the schema's default; data.* from the data set
            if n.startswith("data."):
                if n[5:] not in params:
                    raise ValueError(f"{n} is not set")
                return params[n[5:]]
            try:
                return _lookup(tree, n)
            except KeyError:
                return schema_default(n)

        for target, expr in derived.items():
            try:
                if target in failed:
                    continue
                value = evaluate(expr, lookup)
                if errs := check_tree(nest(target, value)):
                    raise ValueError(errs[0][1])
                values[target] = value
                _set(tree, target, value)
            except ValueError as e:  # once per key, naming the first run it fails for
                add(f"derived.{target}", f"{e} (run {name})")
                failed.add(target)
        tree["group"], tree["run_name"] = group.id, name
        if group.wandb_project:
            tree["project_name"] = group.wandb_project
            _set(tree, "wandb.project", group.wandb_project)
        if group.tags:
            old = (tree.get("wandb") or {}).get("tags")
            _set(tree, "wandb.tags", list(dict.fromkeys((old if isinstance(old, list) else []) + group.tags)))
        if group.storage_root:
            tree["checkpoint_path"] = group.checkpoint_dir(name)
        if group.output_root:
            tree["output_root"] = group.output_root
        group.runs.append(RunSpec(name=name, values=values, config=tree, baseline=i in baselines, data=data,
                                  notes=notes.get(name) or entry.get("notes") or "", data_path=data_path))
    return complete
