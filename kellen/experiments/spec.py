"""Experiment group specs: `configs/experiments/<group>.yaml`, one per group, written once.

Format (every key optional unless marked *):

    id: exp03                       * the group id; also the file's stem; [A-Za-z0-9_.-]+
    extends: _baseline              another spec file in the same folder whose `fixed`, `metrics`,
                                    `wandb_project`, `storage_root`, `output_root`, `researcher`,
                                    `data` are the defaults here (fixed, data: deep merge; tags: union)
    name: Layers vs recursion       title
    question: ...                   the question the group answers
    hypothesis: ...
    expected_outcome: ...
    researcher: kellen
    date: 2026-11-01
    tags: [depth, recursion]        W&B tags (the group id is always a tag)
    wandb_project: TRM-Scaling-Research
    storage_root: gs://bucket       checkpoints go to <storage_root>/checkpoints/<group>/<run>/
    output_root: gs://bucket/runs   run records (default: the schema's `runs`)
    fixed:                          controls: config overrides shared by every run (nested dicts
      arch: {mlp_t: true}           merge over `extends`; lists and scalars replace)
    variables:                      what the runs sweep; dotted config paths
      grid:                         full factorial over these (first key varies slowest)
        ema_rate: [0.99, 0.999]
      zip:                          paired values: one axis, lists of equal length
        arch.L_layers: [1, 2, 3]
        arch.L_cycles: [12, 6, 4]
      runs:                         explicit runs instead of (or after) grid x zip
        - {name: exp08_off, values: {ema: false}, notes: "no EMA"}
    derived:                        computed per run after the variables, by safe arithmetic
      lr: 1e-4 * sqrt(global_batch_size / 6144)     over dotted config paths (and data.*)
    names: [exp03_l1, ...]          explicit run names in run order (default <id>_a, _b, ...)
    baseline: exp03_b               the run that matches the plan's baseline (name or index)
    notes: {exp03_b: "the paper's setting"}   per-run notes
    metrics: [eval/all/exact_accuracy, ...]   metrics to watch
    success_criteria:               machine-checkable: "<metric> <op> <number> [for <run>|baseline|all|any]"
                                    (no `for`: all runs)
      - eval/all/exact_accuracy >= 0.85 for baseline
    analysis: [questions ...]
    runtime_estimate: {per_run_hours: 12, hardware: v4-64}
    related: [exp01, exp02a]
    references: ["Jolicoeur-Martineau 2025, Less is More: Recursive Reasoning with Tiny Networks"]
    data:                           dataset prerequisite; `data.*` may be variables too
      kind: sudoku                  sudoku | maze
      csv: data/raw/sudoku-extreme  or generate: N (+ test_generate)
      subsample_size: 1000
      num_aug: 1000
      seed: 0
      root: gs://bucket/data        where built sets are cached; the directory name is made from
                                    the parameters, so equal parameters share one build:
                                    sudoku-extreme-n1000-aug1000-s0 (kellen.experiments.expand)
                                    other keys: test_csv test_generate min_difficulty min_clues
                                    (sudoku); aug size min_path_len loop_prob (maze)

Variable paths must exist in the config schema (`kellen.train.config.PretrainConfig`) or be
`data.<key>`. Each run's config = schema defaults <- extends.fixed <- fixed <- variables <- derived,
plus group, run_name, project, tags, checkpoint_path and data_paths set by the generator.
`_*.yaml` files are only bases for `extends`; `<id>.run_mapping.yaml` files are generator output.
Loading collects every problem of every group and raises one SpecError, one `<file>: <key>: <what>`
line per problem (`SpecError.problems`).
"""
from __future__ import annotations

import datetime
import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import yaml

from kellen.model.config import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
MAPPING_SUFFIX = ".run_mapping"


def name_problem(name: Any) -> Optional[str]:
    """Why `name` cannot be a group id or run name (it becomes a file name, a path component and
    an argv word), or None. The batch runner refuses the same names (kellen.experiments.runs)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        return "has characters outside [A-Za-z0-9_.-]"
    return "starts with '.'" if name.startswith(".") else None


class SpecError(ConfigError):
    """A problem in a spec: the message names the spec file and the key (one line per problem)."""

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


@dataclass
class Criterion:
    text: str  # as written in the spec
    metric: str  # e.g. eval/all/exact_accuracy
    op: str  # one of >=, >, <=, <, ==
    value: float
    scope: str  # "baseline", "all", "any" or a run name

    def holds(self, value: float) -> bool:
        return {">=": value >= self.value, ">": value > self.value, "<=": value <= self.value,
                "<": value < self.value, "==": value == self.value}[self.op]


@dataclass
class RunSpec:
    name: str  # exp03_a
    values: Dict[str, Any]  # dotted path -> value: the variables (and derived values) of this run
    config: Dict[str, Any]  # the nested overrides written to configs/<name>.yaml
    notes: str = ""
    baseline: bool = False
    data: Dict[str, Any] = field(default_factory=dict)  # the resolved data prerequisite (empty: none)
    data_path: Optional[str] = None  # where that data set lives: <data.root>/<name from its parameters>


@dataclass
class GroupSpec:
    id: str
    path: str  # the spec file
    sha256: str  # of the spec file (and its `extends` chain)
    name: str = ""
    question: str = ""
    hypothesis: str = ""
    expected_outcome: str = ""
    researcher: str = ""
    date: str = ""
    tags: List[str] = field(default_factory=list)
    wandb_project: Optional[str] = None
    storage_root: Optional[str] = None
    output_root: Optional[str] = None
    fixed: Dict[str, Any] = field(default_factory=dict)  # merged with `extends`
    variables: List[str] = field(default_factory=list)  # dotted paths that vary, in spec order
    derived: Dict[str, str] = field(default_factory=dict)
    runs: List[RunSpec] = field(default_factory=list)
    metrics: List[str] = field(default_factory=list)
    success_criteria: List[Criterion] = field(default_factory=list)
    analysis: List[str] = field(default_factory=list)
    runtime_estimate: Dict[str, Any] = field(default_factory=dict)
    related: List[str] = field(default_factory=list)
    references: List[str] = field(default_factory=list)
    data: Dict[str, Any] = field(default_factory=dict)
    extends: List[str] = field(default_factory=list)  # the `extends` chain's files, nearest first

    def run(self, name: str) -> RunSpec:
        for r in self.runs:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def baseline_run(self) -> Optional[RunSpec]:
        return next((r for r in self.runs if r.baseline), None)

    def checkpoint_dir(self, run: str) -> Optional[str]:
        """<storage_root>/checkpoints/<group>/<run> (None without a storage root)."""
        return f"{self.storage_root.rstrip('/')}/checkpoints/{self.id}/{run}" if self.storage_root else None

    def run_dir(self, run: str, output_root: Optional[str] = None) -> str:
        """Where pretrain_jax.py writes the run record: <output_root>/<group>/<run>."""
        root = (output_root or self.output_root or "runs").rstrip("/")
        return f"{root}/{self.id}/{run}"


# ----------------------------------------------------------------------------------------- metrics
_EVAL = ("lm_loss", "q_halt_loss", "q_continue_loss", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps",
         "count")  # kellen/model/losses.py, normalised in kellen/train/evaluate.py
_TRAIN = _EVAL + ("lr", "grad_norm", "param_norm")
_PERF = ("step_time", "examples_per_sec", "tokens_per_sec", "model_tflops_per_device", "mfu", "compile_time",
         "memory_in_use_gib", "memory_peak_gib")  # kellen/train/telemetry.py, loop.py
_METRIC_RE = re.compile(rf"^(train/({'|'.join(_TRAIN)})|eval/[A-Za-z0-9_.-]+/({'|'.join(_EVAL)})"
                        rf"|perf/({'|'.join(_PERF)}))$")
_CRITERION_RE = re.compile(r"^\s*(\S+?)\s*(>=|<=|==|>|<)\s*(\S+)\s*(?:\s+for\s+(\S+))?\s*$")


def is_known_metric(name: str) -> bool:
    """train/<m>, eval/<any set>/<m> and perf/<m>, as the run record and W&B log them."""
    return bool(_METRIC_RE.match(name))


def parse_criterion(text: str) -> Criterion:
    """`<metric> <op> <number> [for <run>|baseline|all|any]`; ValueError says what is wrong."""
    m = _CRITERION_RE.match(text) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"cannot parse {text!r} (want '<metric> <op> <number> [for <run>|baseline|all|any]')")
    metric, op, number, scope = m.groups()
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r}: {number!r} is not a number") from None
    if not is_known_metric(metric):
        raise ValueError(f"unknown metric {metric!r} (known: train/..., eval/<set>/..., perf/...)")
    return Criterion(text=text, metric=metric, op=op, value=value, scope=scope or "all")


# ------------------------------------------------------------------------------------------- YAML
class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """YAML as OmegaConf reads it (1e-4 is a float, dates stay strings), refusing duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key, _ in node.value:
            if key.value in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key.value!r}", key.start_mark)
            seen.add(key.value)
        return super().construct_mapping(node, deep=deep)


FLOAT_RE = re.compile(r"""^(?:[-+]?[0-9]+(?:_[0-9]+)*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9]+(?:_[0-9]+)*(?:[eE][-+]?[0-9]+)
    |\.[0-9]+(?:_[0-9]+)*(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_RE, list("-+0123456789."))
_Loader.yaml_implicit_resolvers = {k: [(t, r) for t, r in v if t != "tag:yaml.org,2002:timestamp"]
                                   for k, v in _Loader.yaml_implicit_resolvers.items()}


def read_yaml(data: bytes):
    return yaml.load(data, Loader=_Loader)


# --------------------------------------------------------------------------------------- problems
def display_path(path: str) -> str:
    """Relative to the working directory when under it (as messages and headers show it)."""
    rel = os.path.relpath(os.path.abspath(path))
    return path if rel.startswith("..") else rel


class Problems:
    """Collects `<file>: <key>: <what>` lines (each once, in order); raise_if_any() -> SpecError."""

    def __init__(self):
        self.lines: List[str] = []
        self._seen = set()

    def add(self, file: str, key: str, what: str) -> None:
        line = f"{display_path(file)}: {key}: {what}" if key else f"{display_path(file)}: {what}"
        if line not in self._seen:
            self._seen.add(line)
            self.lines.append(line)

    def __bool__(self):
        return bool(self.lines)

    def raise_if_any(self) -> None:
        if self.lines:
            raise SpecError(self.lines)


# ------------------------------------------------------------------------------------ spec fields
_STR, _LIST, _DICT = "a string", "a list of strings", "a mapping"
FIELDS = {"id": _STR, "extends": _STR, "name": _STR, "question": _STR, "hypothesis": _STR,
          "expected_outcome": _STR, "researcher": _STR, "date": _STR, "tags": _LIST, "wandb_project": _STR,
          "storage_root": _STR, "output_root": _STR, "fixed": _DICT, "variables": _DICT, "derived": _DICT,
          "names": _LIST, "baseline": "a run name or index", "notes": _DICT, "metrics": _LIST,
          "success_criteria": _LIST, "analysis": _LIST, "runtime_estimate": _DICT, "related": _LIST,
          "references": _LIST, "data": _DICT}
_TEXT_LISTS = ("analysis", "references")  # a single string is one entry
_GROUP_ONLY = ("variables", "derived", "names", "baseline", "notes", "success_criteria")  # an error in a base
_INHERITED = ("fixed", "data", "tags", "metrics", "wandb_project", "storage_root", "output_root", "researcher")


def _check_fields(raw: dict, path: str, problems: Problems) -> dict:
    """Drop (and report) unknown keys and values of the wrong type; returns the usable part."""
    out = {}
    for key, value in raw.items():
        want = FIELDS.get(key)
        if want is None:
            problems.add(path, str(key), f"not a spec key (known: {', '.join(FIELDS)})")
            continue
        if value is None:
            continue
        if key in _TEXT_LISTS and isinstance(value, str):
            value = [value]
        if isinstance(value, (datetime.date, int, float)) and key == "date" and not isinstance(value, bool):
            value = str(value)
        ok = {_STR: isinstance(value, str), _DICT: isinstance(value, dict),
              _LIST: isinstance(value, list) and all(isinstance(v, str) for v in value)}.get(
            want, isinstance(value, (str, int)) and not isinstance(value, bool))
        if not ok:
            problems.add(path, key, f"expected {want}, got {type(value).__name__}")
            continue
        out[key] = value
    return out


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{'arch': {'hidden_size': 32}} -> {'arch.hidden_size': 32}; lists and empty dicts are values."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def deep_merge(base: dict, over: dict) -> dict:
    """Nested dicts merge; lists and scalars in `over` replace. Neither input is changed."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_spec(path: str, problems: Problems) -> Tuple[Optional[dict], bytes]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        problems.add(path, "", f"cannot read: {e.strerror or e}")
        return None, b""
    try:
        raw = read_yaml(data)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "yaml"
        problems.add(path, where, f"not valid YAML: {getattr(e, 'problem', None) or e}")
        return None, data
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.add(path, "", f"a spec is a mapping of keys, got {type(raw).__name__}")
        return None, data
    return _check_fields(raw, path, problems), data


def _chain(path: str, spec_dir: str, problems: Problems) -> List[Tuple[str, dict, bytes]]:
    """The spec and its `extends` bases, nearest first; a broken link ends the chain (reported)."""
    out, seen = [], set()
    while path:
        raw, data = _read_spec(path, problems)
        if raw is None:
            return out if out else [(path, None, data)]
        if out:  # a base: keys that would do nothing there are refused
            for key in _GROUP_ONLY:
                if key in raw:
                    problems.add(path, key, "not inherited by `extends`; put it in the group spec")
        out.append((path, raw, data))
        seen.add(os.path.abspath(path))
        base = raw.get("extends")
        if not base:
            break
        path = os.path.join(spec_dir, base if base.endswith(".yaml") else base + ".yaml")
        if os.path.abspath(path) in seen:
            problems.add(out[-1][0], "extends", f"{base}: extends itself (a cycle)")
            break
        if not os.path.isfile(path):
            problems.add(out[-1][0], "extends", f"{base}: no such spec ({display_path(path)})")
            break
    return out


def _merged(chain) -> dict:
    """The group's keys over what its bases pass on: fixed and data deep-merge, tags unite, and
    metrics, wandb_project, storage_root, output_root, researcher default."""
    merged: Dict[str, Any] = {}
    for i, (path, raw, _) in enumerate(reversed(chain)):  # farthest base first
        for key, value in raw.items():
            if i < len(chain) - 1 and key not in _INHERITED:
                continue
            if key in ("fixed", "data"):
                merged[key] = deep_merge(merged.get(key, {}), value)
            elif key == "tags":
                merged[key] = list(dict.fromkeys(merged.get(key, []) + value))
            else:
                merged[key] = value
    return merged


def _load(path: str, spec_dir: Optional[str], problems: Problems) -> Optional[GroupSpec]:
    from kellen.experiments import expand

    spec_dir = spec_dir or os.path.dirname(path) or "."
    chain = _chain(path, spec_dir, problems)
    if not chain or chain[0][1] is None:
        return None
    raw, stem = chain[0][1], os.path.splitext(os.path.basename(path))[0]
    gid = raw.get("id")
    if not gid:
        problems.add(path, "id", f"missing (the file's stem: id: {stem})")
        gid = stem
    elif name_problem(gid):
        problems.add(path, "id", f"{gid!r} {name_problem(gid)}")
    elif gid != stem:
        problems.add(path, "id", f"{gid!r} is not the file's stem {stem!r}")
    merged = _merged(chain)
    digest = hashlib.sha256()
    for _, _, data in chain:
        digest.update(data)
    group = GroupSpec(id=gid, path=path, sha256=digest.hexdigest(), extends=[p for p, _, _ in chain[1:]])
    for key in ("name", "question", "hypothesis", "expected_outcome", "researcher", "date", "wandb_project",
                "storage_root", "output_root", "tags", "metrics", "analysis", "runtime_estimate", "related",
                "references", "data"):
        if key in merged:
            setattr(group, key, merged[key])
    group.fixed = merged.get("fixed", {})
    group.derived = {str(k): str(v) for k, v in merged.get("derived", {}).items()}
    for metric in group.metrics:
        if not is_known_metric(metric):
            problems.add(path, "metrics", f"unknown metric {metric!r} (known: train/..., eval/<set>/..., perf/...)")
    complete = expand.expand_group(group, merged, chain, problems)
    names = {r.name for r in group.runs}
    for i, text in enumerate(merged.get("success_criteria", [])):
        try:
            c = parse_criterion(text)
        except ValueError as e:
            problems.add(path, f"success_criteria[{i}]", str(e))
            continue
        if not complete:  # the run list is wrong already; no cascade of "no run named"
            pass
        elif c.scope == "baseline" and group.baseline_run is None:
            problems.add(path, f"success_criteria[{i}]", f"{text!r}: 'for baseline' but no baseline run")
        elif c.scope not in ("baseline", "all", "any") and c.scope not in names:
            problems.add(path, f"success_criteria[{i}]", f"{text!r}: no run named {c.scope!r}")
        group.success_criteria.append(c)
    return group


def spec_files(spec_dir: str) -> List[str]:
    """The group specs in a folder: *.yaml except `_*` bases and `*.run_mapping.yaml` outputs."""
    out = []
    for entry in sorted(os.listdir(spec_dir)):
        stem, ext = os.path.splitext(entry)
        if ext == ".yaml" and not stem.startswith("_") and not stem.endswith(MAPPING_SUFFIX):
            out.append(os.path.join(spec_dir, entry))
    return out


def load_many(paths: List[str], spec_dir: Optional[str], problems: Problems) -> Dict[str, GroupSpec]:
    """Load these specs, adding every problem (also duplicate ids and run names across them)."""
    groups: Dict[str, GroupSpec] = {}
    owner: Dict[str, GroupSpec] = {}
    for path in paths:
        group = _load(path, spec_dir, problems)
        if group is None:
            continue
        if group.id in groups:
            problems.add(path, "id", f"{group.id!r} is also the id of {display_path(groups[group.id].path)}")
            continue
        groups[group.id] = group
        for run in group.runs:
            other = owner.setdefault(run.name, group)
            if other is not group:
                problems.add(path, "names", f"run {run.name!r} is also a run of {other.id} "
                                            f"({display_path(other.path)})")
    return groups


def load_group(path: str, spec_dir: Optional[str] = None) -> GroupSpec:
    """One group spec (a path, or a group id in spec_dir), expanded and validated; SpecError lists
    every problem found."""
    if not os.path.exists(path) and NAME_RE.match(path) and not path.endswith(".yaml"):
        path = os.path.join(spec_dir or find_spec_dir(), path + ".yaml")
    problems = Problems()
    group = _load(path, spec_dir, problems)
    problems.raise_if_any()
    return group


def load_all(spec_dir: Optional[str] = None) -> Dict[str, GroupSpec]:
    """Every group spec in the folder (default: the repo's configs/experiments), by id."""
    spec_dir = spec_dir or find_spec_dir()
    problems = Problems()
    if not os.path.isdir(spec_dir):
        raise SpecError(f"{display_path(spec_dir)}: no such spec folder")
    groups = load_many(spec_files(spec_dir), spec_dir, problems)
    problems.raise_if_any()
    return groups


def find_spec_dir(start: Optional[str] = None) -> str:
    """configs/experiments of the repo holding the working directory (else of this package)."""
    here = os.path.abspath(start or os.getcwd())
    while True:
        if os.path.isfile(os.path.join(here, "configs", "cfg_pretrain.yaml")):
            return os.path.join(here, "configs", "experiments")
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(repo, "configs", "experiments")
