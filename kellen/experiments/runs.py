"""Runnable configs, what running one means (its RunTarget), and how a run is launched.

A run name maps to a primary Hydra config `<config dir>/<name>.yaml` (default dir: the repo's
configs/; `--config-dir DIR` adds DIR the way pretrain_jax.py's own flag does). A target is
resolved from the YAML alone, the same way pretrain_jax.py names its run dir:

    run name  = run_name(<run_name key>, <config name>, <overrides>)   (kellen.train.run_record)
    group     = <group key> or default_group(run name)
    run dir   = <output_root>/<group>/<run name>       (output_root: --output-root, YAML, "runs")

so `exp03_a epochs=10000` is the run `exp03_a--epochs=10000` and never touches `exp03_a`. Names
that reach a path, argv or a tmux command are limited to [A-Za-z0-9_.-]; others are refused.

Launchers (kellen.experiments.local_launcher, .launchers) run `python pretrain_jax.py <argv>` to
completion and return its exit code: 0 completed, 75 preempted (resumable), 2 bad config/data,
anything else failed.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

# Launchers live in kellen.experiments.local_launcher; these names are kept here for callers.
from kellen.experiments.local_launcher import PRETRAIN, REPO, Launcher, LocalLauncher, run_env  # noqa: F401

REPO_CONFIGS = os.path.join(REPO, "configs")

EXIT_COMPLETED, EXIT_FAILED, EXIT_BAD_CONFIG, EXIT_PREEMPTED = 0, 1, 2, 75
DEFAULT_DATA_PATH = "data/sudoku-extreme-1k-aug-1000"  # the schema's data_paths default
NOT_RUNS = ("cfg_pretrain",)  # primary configs that are bases, not runs (still runnable by name)

_RUN_NAME = re.compile(r"[A-Za-z0-9_.=+-]+")  # config names plus `--key=value` variants
_SAFE_PATTERN = re.compile(r"[A-Za-z0-9_.*?\[\]!-]+")
_OVERRIDE = re.compile(r"(\+{1,2}|~)?[A-Za-z_][A-Za-z0-9_./@]*(=.*)?", re.S)


class RunError(ValueError):
    """A bad name, override or config: the message is one line, fit for the console."""


def check_name(name: str, what: str = "run name") -> str:
    """Refuse anything but [A-Za-z0-9_.-]+ (and '.'/'..'-style names) before it reaches a path or argv."""
    from kellen.experiments.spec import name_problem  # one rule for spec names and run names

    if name_problem(name):
        raise RunError(f"invalid {what} {name!r}: use only letters, digits, '_', '.', '-' (not starting with '.')")
    return name


def is_run_name(value: Any) -> bool:
    """A run name (a config name or a `<name>--key=value` variant): [A-Za-z0-9_.=+-], not starting with '.'."""
    return bool(_RUN_NAME.fullmatch(str(value))) and not str(value).startswith(".")


def check_pattern(pattern: str) -> str:
    if not _SAFE_PATTERN.fullmatch(pattern or "") or pattern.startswith("."):
        raise RunError(f"invalid pattern {pattern!r}: use letters, digits, '_', '.', '-' and the globs * ? [ ] !")
    return pattern


_NAME_KEYS = ("run_name", "group")  # values that become a path component of the run dir
_PATH_KEYS = ("output_root", "checkpoint_path", "load_checkpoint")  # where a run writes or reads its state


def check_override(override: str) -> str:
    """key=value / +key=value / ~key: Hydra parses the value; argv lists mean no shell sees it.
    Refused besides: hydra.* (Hydra would write its own files where they say), `..` in a key or
    in a path value (output_root, checkpoint_path, load_checkpoint), a run_name or group that is
    not a plain name, and any credential (a secret from the environment, user:password@ or
    ?token= in a URL): secrets travel by environment only, never on a command line."""
    if not _OVERRIDE.fullmatch(override) or "\n" in override or "\0" in override:
        raise RunError(f"invalid override {override!r}: expected key=value (keys: letters, digits, '_', '.')")
    from kellen.train.redact import redact

    key, eq, value = override.lstrip("+~").partition("=")
    if redact(value) != value:
        raise RunError(f"invalid override {key}=<redacted>: it carries a credential; pass secrets by "
                       "environment variables, never on the command line")
    if key.split(".")[0].split("/")[0] == "hydra":
        raise RunError(f"invalid override {override!r}: Hydra's own settings are fixed by the runner")
    if ".." in key:
        raise RunError(f"invalid override {override!r}: '..' in the key")
    parsed = override_values([override]).get(key) if eq else None
    if key in _NAME_KEYS and parsed is not None and not is_run_name(parsed):
        raise RunError(f"invalid override {override!r}: {key} must be letters, digits, '_', '.', '-', '=', '+' "
                       "(not starting with '.')")
    if key in _PATH_KEYS and isinstance(parsed, str) and ".." in parsed.replace("\\", "/").split("/"):
        raise RunError(f"invalid override {override!r}: '..' in {key} (give the path without it)")
    return override


@dataclass
class RunTarget:
    name: str  # the run name: the run dir's last component (exp03_a, exp03_a--epochs=10000)
    config_name: str  # <config dir>/<config_name>.yaml
    group: str
    run_dir: str  # <output_root>/<group>/<name>: absolute local path or gs://
    overrides: List[str] = field(default_factory=list)  # Hydra overrides after --config-name
    config_dir: Optional[str] = None  # the extra --config-dir (None: the repo's configs/)
    checkpoint_dir: str = ""  # checkpoint_path or <run_dir>/checkpoints
    data_path: str = ""  # data_paths[0] as the run will see it (absolute local path or gs://)
    data_build: bool = False  # the trainer builds data_path itself when it is missing

    def pretrain_argv(self) -> List[str]:
        """Arguments for `python pretrain_jax.py`, run from the repo root."""
        argv = ["--config-name", self.config_name, *self.overrides]
        if self.config_dir:  # repo-relative when inside it: the same argv works on every TPU host
            rel = os.path.relpath(self.config_dir, REPO)
            argv = ["--config-dir", self.config_dir if rel.startswith("..") else rel] + argv
        return argv


def config_dirs(config_dir: Optional[str]) -> List[str]:
    """Where primary configs are looked up, first match wins (the extra dir, then configs/)."""
    dirs = [os.path.abspath(config_dir)] if config_dir else []
    return dirs + ([REPO_CONFIGS] if REPO_CONFIGS not in dirs else [])


def config_file(name: str, config_dir: Optional[str] = None) -> Optional[str]:
    check_name(name, "config name")
    for d in config_dirs(config_dir):
        path = os.path.join(d, name + ".yaml")
        if os.path.isfile(path):
            return path
    return None


def discover(config_dir: Optional[str] = None) -> List[str]:
    """Runnable config names, sorted: the primary configs (top-level *.yaml) of the extra config
    dir when one is given, else of configs/; bases (cfg_pretrain, _*) and unsafe names left out."""
    d = os.path.abspath(config_dir) if config_dir else REPO_CONFIGS
    if not os.path.isdir(d):
        raise RunError(f"config dir {d} does not exist")
    names = [f[:-5] for f in os.listdir(d) if f.endswith(".yaml") and os.path.isfile(os.path.join(d, f))]
    from kellen.experiments.spec import name_problem

    return sorted(n for n in names if not name_problem(n) and not n.startswith("_") and n not in NOT_RUNS)


def read_config_yaml(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            body = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise RunError(f"{path}: unreadable YAML: {' '.join(str(e).split())}") from None
    if not isinstance(body, dict):
        raise RunError(f"{path}: not a YAML mapping")
    return body


def override_values(overrides: List[str]) -> Dict[str, Any]:
    """{key: value} of plain and + overrides, values parsed as YAML the way Hydra mostly would."""
    out = {}
    for o in overrides:
        key, eq, value = o.lstrip("+~").partition("=")
        if eq:
            try:
                out[key] = yaml.safe_load(value)
            except yaml.YAMLError:
                out[key] = value
    return out


def join_path(root: str, *parts: str) -> str:
    """`root/parts...`; a relative local root is the repo's (where run commands start)."""
    from kellen import gcs

    return gcs.join(root if gcs.is_gcs(root) or os.path.isabs(root) else os.path.join(REPO, root), *parts)


def resolve(name: str, overrides: Optional[List[str]] = None, *, config_dir: Optional[str] = None,
            output_root: Optional[str] = None) -> RunTarget:
    """The RunTarget of config `name` with `overrides`, read from the YAML (no Hydra compose).
    `output_root` (the --output-root option) is passed on as an `output_root=` override.
    Raises RunError on bad names or a missing config."""
    from kellen.train.run_record import run_name

    check_name(name, "config name")
    overrides = [check_override(o) for o in (overrides or [])]
    path = config_file(name, config_dir)
    if path is None:
        raise RunError(f"no config {name}.yaml in {' or '.join(config_dirs(config_dir))}")
    if output_root:
        overrides = [o for o in overrides if o.split("=", 1)[0] != "output_root"] + [f"output_root={output_root}"]
    own = read_config_yaml(path)
    cfg = {**own, **override_values(overrides)}
    canonical = run_name(own.get("run_name"), name, [])  # the run this config names with no overrides
    checkpoint = cfg.get("checkpoint_path")
    if checkpoint and run_name(cfg.get("run_name"), name, overrides) != canonical \
            and "checkpoint_path" not in override_values(overrides):
        # The config's checkpoint dir belongs to the canonical run: a variant gets its own.
        parent = checkpoint.rstrip("/")
        parent = parent.rsplit("/", 1)[0] if parent.rsplit("/", 1)[-1] == canonical else parent
        overrides.append(f"checkpoint_path='{parent}/{run_name(cfg.get('run_name'), name, overrides)}'")
        cfg = {**own, **override_values(overrides)}
    target = RunTarget(name="", config_name=name, group="", run_dir="", overrides=overrides,
                       config_dir=os.path.abspath(config_dir) if config_dir else None)
    if needs_compose(own, overrides, config_dir):  # values come from other files: ask Hydra
        from omegaconf import OmegaConf

        return with_values(target, OmegaConf.to_container(compose(target), resolve=True))
    return with_values(target, cfg)


def needs_compose(own: Dict[str, Any], overrides: List[str], config_dir: Optional[str]) -> bool:
    """True when the YAML alone cannot say where the run goes: its defaults list pulls in more than
    cfg_pretrain, or an override picks a config group (+experiment=quick_test, arch=...)."""
    extra = [d for d in own.get("defaults") or [] if d not in ("cfg_pretrain", "_self_")
             and not (isinstance(d, str) and d.startswith("override hydra/"))]
    groups = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    return bool(extra) or any(os.path.isdir(os.path.join(d, g)) for d in config_dirs(config_dir) for g in groups if g)


def with_values(target: RunTarget, cfg: Dict[str, Any]) -> RunTarget:
    """Fill in the target's names and places from config values: the YAML plus overrides, or the
    config Hydra composed from them (a dry run reports exactly what Hydra made)."""
    from kellen.train.run_record import default_group, run_name

    run = run_name(cfg.get("run_name"), target.config_name, target.overrides)
    group = cfg.get("group") or default_group(run)
    for label, value in (("run name", run), ("group", group)):
        if not is_run_name(value):
            raise RunError(f"{target.config_name}: invalid {label} {value!r}")
    run_dir = join_path(str(cfg.get("output_root") or "runs"), str(group), run)
    checkpoint = cfg.get("checkpoint_path")
    data_paths = cfg.get("data_paths") or [DEFAULT_DATA_PATH]
    data = str(data_paths[0]) if isinstance(data_paths, list) else str(data_paths)
    return RunTarget(name=run, config_name=target.config_name, group=str(group), run_dir=run_dir,
                     overrides=list(target.overrides), config_dir=target.config_dir,
                     checkpoint_dir=join_path(str(checkpoint)) if checkpoint else join_path(run_dir, "checkpoints"),
                     data_path=join_path(data), data_build=bool(cfg.get("data_build")))


def with_run_name(target: RunTarget, new_name: str, *, config_dir: Optional[str] = None,
                  output_root: Optional[str] = None) -> RunTarget:
    """The same config run under another name (a --rerun): `run_name=<new_name>` as an override."""
    check_name(new_name.replace("=", "_").replace("+", "_"), "run name")
    keep = [o for o in target.overrides if o.split("=", 1)[0] not in ("run_name", "checkpoint_path", "output_root")]
    return resolve(target.config_name, keep + [f"run_name='{new_name}'"], config_dir=config_dir,
                   output_root=output_root)


def compose(target: RunTarget):
    """Compose the target's config through Hydra exactly as pretrain_jax.py would (typed schema,
    unknown keys refused); returns the DictConfig. Raises RunError with a one-line message."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    from kellen.train.config import check_known_keys, register

    register()
    home = os.path.dirname(config_file(target.config_name, target.config_dir) or REPO_CONFIGS)
    others = [d for d in config_dirs(target.config_dir) if d != home]
    # Primary configs are only found in the initialised dir; the others join as search paths.
    search = [f"hydra.searchpath=[{','.join('file://' + d for d in others)}]"] if others else []
    try:
        with initialize_config_dir(config_dir=home, version_base="1.3"):
            cfg = hydra_compose(config_name=target.config_name, overrides=search + target.overrides)
        check_known_keys(cfg)
        OmegaConf.to_object(cfg)  # type checks the schema does only on conversion
        return cfg
    except Exception as e:  # Hydra and OmegaConf raise many kinds; all mean "bad config"
        raise RunError(one_line(e)) from None


def one_line(e: BaseException) -> str:
    lines = [ln.strip().rstrip(":") for ln in str(e).splitlines() if ln.strip() and not ln.startswith(("    ", "\t"))]
    if e.__cause__ is not None and str(e.__cause__).strip():
        lines.append(str(e.__cause__).strip().splitlines()[0])
    return ": ".join(dict.fromkeys(lines))[:400] or type(e).__name__


# --------------------------------------------------------------------------- selection and state on disk
@dataclass
class Selection:
    """Which configs a command means: glob patterns, regexes and explicit names (any mix; a run is
    selected if anything matches it), plus overrides applied to every selected run."""
    patterns: List[str] = field(default_factory=list)
    regexes: List[str] = field(default_factory=list)
    names: List[str] = field(default_factory=list)
    overrides: List[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.patterns or self.regexes or self.names)


def matches_pattern(name: str, pattern: str) -> bool:
    """fnmatch glob (`exp03*`, `exp0[1-3]*`); a pattern without glob characters also matches its
    runs, since `--pattern exp03` is how the researcher means "group exp03": exp03 and exp03_*."""
    import fnmatch

    if fnmatch.fnmatchcase(name, pattern):
        return True
    return not any(c in pattern for c in "*?[") and name.startswith(pattern + "_")


def select(selection: Selection, config_dir: Optional[str] = None) -> List[str]:
    """Config names in order: explicit names first (as given, even when their config is missing, so
    the plan can say so), then discovered configs matching a pattern or regex, sorted."""
    for n in selection.names:
        check_name(n, "config name")
    for p in selection.patterns:
        check_pattern(p)
    try:
        regexes = [re.compile(r) for r in selection.regexes]
    except re.error as e:
        raise RunError(f"invalid --regex: {e}") from None
    found = discover(config_dir) if (selection.patterns or selection.regexes or selection.empty) else []
    chosen = [n for n in found if selection.empty or any(matches_pattern(n, p) for p in selection.patterns)
              or any(r.search(n) for r in regexes)]
    return list(dict.fromkeys(list(selection.names) + chosen))


def exists(path: str) -> bool:
    from kellen import gcs

    return gcs.exists(path) if gcs.is_gcs(path) else os.path.exists(path)


def list_dir(path: str) -> List[str]:
    """Immediate children names (files and dirs) of a local dir or gs:// prefix; [] if absent."""
    from kellen import gcs

    if not gcs.is_gcs(path):
        try:
            return sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []
    bucket, prefix = gcs.split_gcs(path)
    base = prefix + "/" if prefix else ""
    pages = gcs.client().list_blobs(bucket, prefix=base, delimiter="/")
    names = {b.name[len(base):] for b in pages}
    names |= {p[len(base):].rstrip("/") for p in pages.prefixes}
    return sorted(n for n in names if n)
