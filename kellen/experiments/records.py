"""The run records of one experiment group, read for comparison (kellen compare, guide --results).

A group's records sit at `<root>/<group>/<run>/` wherever they are: the group's output root
(local `runs/` or gs://…/runs), or a results dir that `kellen results download` (or
`gsutil -m cp -r`) filled. Every run dir found there is read, plus every run the spec names
(a spec run with no dir shows as not_started). Nothing here raises on a bad record: a missing
or torn file becomes a note on that run, so one broken run never hides the others.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import yaml

from kellen.experiments.status import _read, run_status
from kellen.gcs import join
from kellen.train import summary as summary_mod

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_RESULTS = "results"


@dataclass
class RunResult:
    name: str
    run_dir: str
    in_spec: bool  # named by the group spec (else an override variant or a stray dir)
    values: Dict[str, Any]  # the group's variables (dotted keys) for this run
    status: Dict[str, Any]  # run_status(): state, step, total, summary, error
    rows: List[Dict[str, Any]] = field(default_factory=list)  # deduped logs/metrics.jsonl
    config: Dict[str, Any] = field(default_factory=dict)  # config.yaml, nested
    notes: List[str] = field(default_factory=list)  # what is missing or unreadable

    @property
    def state(self) -> str:
        return self.status.get("state", "not_started")

    @property
    def summary(self) -> Mapping[str, Any]:
        s = self.status.get("summary")
        return s if isinstance(s, Mapping) else {}


def dotted(tree: Mapping[str, Any], key: str) -> Any:
    """tree["arch"]["hidden_size"] for "arch.hidden_size"; None when any level is missing."""
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _abs(root: str) -> str:
    """Relative local roots are the repo's (where run commands start), like the runners' paths."""
    if root.startswith("gs://") or os.path.isabs(root):
        return root
    return os.path.join(REPO, root) if not os.path.exists(root) else os.path.abspath(root)


def group_dir(group, source: Optional[str] = None) -> str:
    """Where the group's run dirs are. `source`: a results dir or an output root (local or gs://),
    holding `<group>/`; a path that already ends in the group id is taken as the group dir. No
    source: `results/<group>` if it was downloaded, else the spec's output root."""
    if source is None:
        local = _abs(os.path.join(DEFAULT_RESULTS, group.id))
        if os.path.isdir(local):
            return local
        source = group.output_root or "runs"
    source = source.rstrip("/") if source.startswith("gs://") else _abs(source)
    inner = join(source, group.id)
    # A source ending in the group id is the group dir itself, unless (locally) it holds <group>/.
    if source.rstrip("/").rsplit("/", 1)[-1] == group.id and (source.startswith("gs://") or not os.path.isdir(inner)):
        return source.rstrip("/")
    return inner


def run_dirs(gdir: str) -> List[str]:
    """Run dir names under a group dir ("_"/"." dirs are bookkeeping, not runs)."""
    if gdir.startswith("gs://"):
        from kellen import gcs
        from kellen.experiments.results_download import check_credentials
        from kellen.experiments.status import _gcs_unreachable

        check_credentials([gcs.split_gcs(gdir)[0]])  # no credentials: say how to log in, not a 401
        why = _gcs_unreachable(gcs.split_gcs(gdir)[0])
        if why:
            raise OSError(f"cannot list {gdir}: {why}")
        names = gcs.list_dirs(gdir)
    elif os.path.isdir(gdir):
        names = sorted(n for n in os.listdir(gdir) if os.path.isdir(os.path.join(gdir, n)))
    else:
        names = []
    return [n for n in names if not n.startswith(("_", "."))]


def load_run(name: str, run_dir: str, group, spec_values: Optional[Dict[str, Any]] = None) -> RunResult:
    status = run_status(run_dir)
    result = RunResult(name=name, run_dir=run_dir, in_spec=spec_values is not None,
                       values=dict(spec_values or {}), status=status)
    if status.get("error"):
        result.notes.append(status["error"])
    text = _safe_read(join(run_dir, "config.yaml"), result)
    if status["state"] == "not_started":
        if text is None:
            result.notes.append("no run record")
            return result
        result.notes.append("partial record: no status.json")  # died before its first status write
    if text is None:
        result.notes.append("no config.yaml")
    else:
        try:
            cfg = yaml.safe_load(text)
            result.config = cfg if isinstance(cfg, dict) else {}
        except yaml.YAMLError as e:
            result.notes.append(f"unreadable config.yaml: {str(e).splitlines()[0]}")
    for key in group.variables:  # the record says what actually ran (overrides included)
        value = dotted(result.config, key)
        if value is not None:
            result.values[key] = value
    text = _safe_read(join(run_dir, "logs/metrics.jsonl"), result)
    if text is None:
        result.notes.append("no logs/metrics.jsonl")
    else:
        result.rows = summary_mod.dedupe(summary_mod.parse_rows(text.splitlines()))
    if status["state"] != "not_started" and not result.summary:
        if result.rows:  # summary.json missing or torn: rebuild it from the metrics log
            status["summary"] = summary_mod.summarize(result.rows)
            result.notes.append("summary rebuilt from logs/metrics.jsonl")
        else:
            result.notes.append("no summary.json")
    return result


def _safe_read(path: str, result: RunResult) -> Optional[str]:
    try:
        return _read(path)
    except Exception as e:  # network, permissions: a note, not a crash
        result.notes.append(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return None


def load_group_results(group, source: Optional[str] = None) -> List[RunResult]:
    """Every run of `group`: the spec's runs in spec order, then other run dirs found (sorted)."""
    gdir = group_dir(group, source)
    found = run_dirs(gdir)
    out = [load_run(r.name, join(gdir, r.name), group, dict(r.values)) for r in group.runs]
    spec_names = {r.name for r in group.runs}
    out += [load_run(n, join(gdir, n), group) for n in found if n not in spec_names]
    return out
