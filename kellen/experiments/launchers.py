"""Where a batch's runs execute, and how a batch outlives its terminal (docs/tpu_pods.md).

- `TpuVmLauncher`: every worker of a Cloud TPU VM slice runs the same `pretrain_jax.py` command
  through `gcloud compute tpus tpu-vm ssh NAME --zone Z [--project P] --worker=all --command CMD`.
  Before each run it stops stale trainers and frees the TPU on every worker; each worker prints
  `KELLEN_WORKER_EXIT worker=<id> code=<rc>` and `aggregate()` turns those into one exit code.
- `relaunch_in_tmux`: the batch scripts' `--tmux`: the same command in a new detached tmux session.
- `safe_name`: the only names allowed to reach a shell or a command line as a bare word.

Secrets never go on a command line: gcloud/ssh forward no environment, so workers hold their own
W&B key (`wandb login` once per worker, kept in ~/.netrc); only the non-secret settings named in
`FORWARD_ENV` travel, as quoted `env NAME=VALUE` words of the remote command.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from kellen.train.redact import SECRET_NAME, secret_values

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PREEMPTED = 0, 1, 2, 75
DEFAULT_REPO_DIR = "~/kellen"
# Settings a worker needs from the launching machine. Everything else (TPU_*, JAX_PLATFORMS,
# XLA_FLAGS, KELLEN_COORDINATOR, ...) describes the launching host and would be wrong on a worker.
FORWARD_ENV = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_TAGS", "KELLEN_CACHE", "LIBTPU_INIT_ARGS")
TMUX_SOCKET_ENV = "KELLEN_TMUX_SOCKET"  # a private tmux server (-L NAME); the tests use one

_SAFE = re.compile(r"[A-Za-z0-9_.-]+")
_MARK = re.compile(r"\b(KELLEN_WORKER_[A-Z]+) worker=(\S+) [a-z]+=(\S+)")
# The worker's index in the slice (metadata server); KELLEN_PROCESS_ID first so a stand-in pod
# of local processes (tests/fake_gcloud) can say which worker it is; the hostname as last resort.
_WORKER_ID = ('w="${KELLEN_PROCESS_ID:-$(curl -sf -m 5 -H Metadata-Flavor:Google http://metadata.google.internal/'
              'computeMetadata/v1/instance/attributes/agent-worker-number || hostname)}"')


def safe_name(s, what: str = "name") -> str:
    """`s` if it is a plain word ([A-Za-z0-9_.-], not '.', '..' or an option); else ValueError."""
    if not isinstance(s, str) or not _SAFE.fullmatch(s) or s in (".", "..") or s.startswith("-"):
        raise ValueError(f"unsafe {what} {s!r}: only letters, digits, '_', '.' and '-' are allowed "
                         "(and it may not start with '-')")
    return s


def remote_path(p: str) -> str:
    """A path as one shell word; a leading ~/ stays bare so the worker's shell expands it."""
    if p == "~":
        return p
    if p.startswith("~/"):
        return "~/" + shlex.quote(p[2:])
    return shlex.quote(p)


def forwarded_env(env: Mapping[str, str], names: Iterable[str] = FORWARD_ENV) -> Dict[str, str]:
    """The allowed, non-secret settings of `env` (a secret-looking name is dropped even if listed)."""
    return {k: env[k] for k in names if k in env and not SECRET_NAME.search(k)}


def parse_markers(lines: Iterable[str], mark: str) -> Dict[str, str]:
    """{worker: value} from `<mark> worker=<id> <key>=<value>` lines. Real gcloud interleaves the
    workers' output unprefixed, so the marker may sit anywhere in a line; the last one wins."""
    out: Dict[str, str] = {}
    for line in lines:
        for m in _MARK.finditer(line):
            if m.group(1) == mark:
                out[m.group(2)] = m.group(3)
    return out


def _worker_order(w: str):
    return (0, int(w), "") if w.isdigit() else (1, 0, w)


def aggregate(codes: Mapping[str, str], expected: Iterable[str]) -> Tuple[int, List[str]]:
    """One exit code for the slice and the problems found: any 75 -> 75 (a preempted slice resumes
    even if some workers could not report); else the first non-zero by worker; else a missing or
    unreadable marker -> 1; else 0."""
    expected = sorted(set(expected) | set(codes), key=_worker_order)
    problems, values = [], {}
    for w in expected:
        v = codes.get(w)
        if v is None:
            problems.append(f"worker {w}: no exit marker (ssh lost or killed before the trainer ended)")
        elif not v.lstrip("-").isdigit():
            problems.append(f"worker {w}: unreadable exit marker {v!r}")
        else:
            values[w] = int(v)
            if values[w]:
                problems.append(f"worker {w}: exit code {values[w]}")
    if not expected:
        problems.append("no worker reported")
    if EXIT_PREEMPTED in values.values():
        return EXIT_PREEMPTED, problems
    for w in expected:
        if values.get(w):
            return values[w], problems
    return (EXIT_FAILED if problems else EXIT_OK), problems


class LaunchError(RuntimeError):
    """The slice is not fit to run on (unreachable workers, mismatched code)."""


class TpuVmLauncher:
    """Runs one training run on every worker of a TPU VM slice through `gcloud ... ssh --worker=all`.

    repo_dir: the checkout on each worker (`~/` is expanded there); python: the interpreter there.
    commit: if set, `ensure_same_commit(commit)` runs before every launch and refuses on mismatch.
    free_tpu_devices: also kill whatever holds /dev/accel* or /dev/vfio/N and remove
    /tmp/libtpu_lockfile (off in the tests, whose "workers" are this machine).
    """

    name = "tpu-vm"

    def __init__(self, tpu: str, zone: str, project: Optional[str] = None, gcloud: str = "gcloud",
                 repo_dir: str = DEFAULT_REPO_DIR, python: str = "python3", commit: Optional[str] = None,
                 forward_env: Sequence[str] = FORWARD_ENV, stale_grace_s: int = 30, free_tpu_devices: bool = True):
        self.tpu, self.zone = safe_name(tpu, "TPU name"), safe_name(zone, "zone")
        self.project = safe_name(project, "project") if project else None
        if commit is not None and not re.fullmatch(r"[0-9a-f]{7,40}", commit):
            raise ValueError(f"commit {commit!r} must be a hex commit id (7-40 characters)")
        self.gcloud, self.repo_dir, self.python, self.commit = gcloud, repo_dir, python, commit
        self.forward_env, self.stale_grace_s = tuple(forward_env), int(stale_grace_s)
        self.free_tpu_devices = free_tpu_devices

    # ---------------------------------------------------------------- the commands gcloud receives
    def ssh_argv(self, command: str) -> List[str]:
        argv = [self.gcloud, "compute", "tpus", "tpu-vm", "ssh", self.tpu, "--zone", self.zone]
        if self.project:
            argv += ["--project", self.project]
        return argv + ["--worker=all", "--command", command]

    def _trainer_pids(self) -> str:
        """Shell setting $pids to the trainers started from this checkout: their cwd is the repo
        (the launch shell itself stays in ~, see run_command); [.] keeps the shell's own command
        line from matching."""
        return (f"here=$(cd {remote_path(self.repo_dir)} 2>/dev/null && pwd -P)\n"
                'pids=""; if [ -n "$here" ]; then for p in $(pgrep -f "pretrain_jax[.]py"); do '
                '[ "$p" != "$$" ] && [ "$(readlink /proc/$p/cwd 2>/dev/null)" = "$here" ] && pids="$pids $p"; done; fi')

    def cleanup_command(self) -> str:
        """Stop trainers left running from this checkout (SIGTERM: they checkpoint and exit 75;
        SIGKILL after the grace), optionally free the TPU, then report in."""
        lines = [
            _WORKER_ID, self._trainer_pids(),  # (a zombie is dead: its parent has not reaped it yet)
            'if [ -n "$pids" ]; then echo "worker $w: stopping stale trainers:$pids"; kill -TERM $pids 2>/dev/null; '
            f'for i in $(seq {self.stale_grace_s}); do alive=""; '
            'for p in $pids; do ps -o stat= -p $p | grep -qv "^Z" && alive=1; done; '
            '[ -z "$alive" ] && break; sleep 1; done; kill -KILL $pids 2>/dev/null; fi',
        ]
        if self.free_tpu_devices:
            lines += [
                "if ls /dev/accel* /dev/vfio/[0-9]* >/dev/null 2>&1; then "
                "sudo -n fuser -k -9 /dev/accel* /dev/vfio/[0-9]* >/dev/null 2>&1 || "
                "fuser -k -9 /dev/accel* /dev/vfio/[0-9]* >/dev/null 2>&1; sleep 1; fi",
                "sudo -n rm -f /tmp/libtpu_lockfile 2>/dev/null || rm -f /tmp/libtpu_lockfile",
            ]
        return "\n".join(lines + ['echo "KELLEN_WORKER_READY worker=$w ok=1"'])

    def signal_command(self, sig: str) -> str:
        """Send `sig` (TERM: save and exit 75; KILL) to this checkout's trainers on every worker."""
        return "\n".join([_WORKER_ID, self._trainer_pids(),
                          f'[ -n "$pids" ] && echo "worker $w: SIG{sig} to$pids" && kill -{sig} $pids; exit 0'])

    def run_command(self, argv: Sequence[str], env: Mapping[str, str]) -> str:
        fwd = forwarded_env(env, self.forward_env)
        words = ["exec", "env"] + [shlex.quote(f"{k}={v}") for k, v in fwd.items()] + \
            [remote_path(self.python), "pretrain_jax.py"] + [shlex.quote(str(a)) for a in argv]
        # The subshell cds and becomes the trainer; this shell stays in ~ to print the marker.
        return "\n".join([_WORKER_ID, f"(cd {remote_path(self.repo_dir)} && " + " ".join(words) + ")",
                          'rc=$?; echo "KELLEN_WORKER_EXIT worker=$w code=$rc"; exit $rc'])

    def commit_command(self, commit: str) -> str:
        return "\n".join([
            _WORKER_ID,
            f'cd {remote_path(self.repo_dir)} || {{ echo "KELLEN_WORKER_HEAD worker=$w head=no-checkout"; exit 1; }}',
            f"git fetch --quiet origin; git checkout --quiet {shlex.quote(commit)}",
            'head=$(git rev-parse HEAD 2>/dev/null || echo none)',
            # a dirty tree would run other code than the commit says
            '[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && head="$head+dirty"',
            'echo "KELLEN_WORKER_HEAD worker=$w head=$head"'])

    # ---------------------------------------------------------------- steps
    def _ssh_markers(self, command: str, mark: str, stdout_path: str, stderr_path: str, interruptible=False):
        """Run `command` on all workers, appending to the log files; (gcloud rc, {worker: value})."""
        with open(stdout_path, "ab") as out, open(stderr_path, "ab") as err:
            start = out.tell()
            rc = self._ssh(command, out, err, interruptible)
        with open(stdout_path, encoding="utf-8", errors="replace") as f:
            f.seek(start)
            return rc, parse_markers(f, mark)

    def _ssh(self, command: str, out, err, interruptible: bool) -> int:
        # Own session: a terminal's Ctrl-C must not kill gcloud (the workers' markers come through
        # it). stdin closed: gcloud must not wait on a prompt (set keys up once by hand, see docs).
        proc = subprocess.Popen(self.ssh_argv(command), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                if not interruptible:
                    raise
                try:  # killing gcloud would not stop the workers (no pty): ask them to save, exit 75
                    self._signal(err, "TERM")
                    return proc.wait()
                except KeyboardInterrupt:  # asked twice: no waiting for the save
                    self._signal(err, "KILL")
                    raise
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def _signal(self, err, sig: str) -> None:
        err.write(f"kellen-launcher: interrupted: SIG{sig} to the trainers on {self.tpu}\n".encode())
        err.flush()
        try:
            subprocess.run(self.ssh_argv(self.signal_command(sig)), stdout=err, stderr=err,
                           stdin=subprocess.DEVNULL, start_new_session=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            err.write(f"kellen-launcher: could not signal the trainers: {e}\n".encode())

    def clear_stale(self, stdout_path: str, stderr_path: str) -> List[str]:
        """Stop stale trainers on every worker; the workers that answered (the expected set)."""
        rc, ready = self._ssh_markers(self.cleanup_command(), "KELLEN_WORKER_READY", stdout_path, stderr_path)
        if rc != 0 or not ready:
            raise LaunchError(f"cleanup on {self.tpu} failed (gcloud exit {rc}, workers answering: "
                              f"{sorted(ready, key=_worker_order) or 'none'}); see {stderr_path}")
        return sorted(ready, key=_worker_order)

    def ensure_same_commit(self, commit: Optional[str] = None, stdout_path: Optional[str] = None,
                           stderr_path: Optional[str] = None) -> Dict[str, str]:
        """Check out `commit` on every worker and verify `git rev-parse HEAD` (clean tree) there;
        {worker: head}, or LaunchError naming the workers elsewhere. Logs go to a temp dir if no paths."""
        commit = commit or self.commit
        if not commit or not re.fullmatch(r"[0-9a-f]{7,40}", commit):
            raise ValueError(f"commit {commit!r} must be a hex commit id (7-40 characters)")
        if stdout_path is None or stderr_path is None:
            with tempfile.TemporaryDirectory(prefix="kellen-commit-") as d:
                return self.ensure_same_commit(commit, os.path.join(d, "out"), os.path.join(d, "err"))
        rc, heads = self._ssh_markers(self.commit_command(commit), "KELLEN_WORKER_HEAD", stdout_path, stderr_path)
        bad = {w: h for w, h in heads.items() if not h.startswith(commit) or h.endswith("+dirty")}
        if rc != 0 or not heads or bad:
            raise LaunchError(f"workers of {self.tpu} are not at commit {commit}: " +
                              (", ".join(f"worker {w} at {h}" for w, h in sorted(bad.items())) or
                               f"gcloud exit {rc}, workers answering: {sorted(heads)}"))
        return heads

    def launch(self, target, argv: List[str], env: Dict[str, str], stdout_path: str, stderr_path: str) -> int:
        def note(msg: str) -> None:
            with open(stderr_path, "a", encoding="utf-8") as f:
                f.write(f"kellen-launcher: {msg}\n")

        command = self.run_command(argv, env)
        if any(s in command for s in secret_values({**os.environ, **env})):
            # e.g. a key pasted into an override: refuse rather than show it in ps and gcloud's logs
            note("refused: a secret value from the environment would appear on the gcloud command line")
            return EXIT_USAGE
        try:
            try:
                if self.commit:
                    self.ensure_same_commit(self.commit, stdout_path, stderr_path)
                workers = self.clear_stale(stdout_path, stderr_path)
            except KeyboardInterrupt:  # before the trainers started: nothing to save, resumable
                note("interrupted before the run started")
                return EXIT_PREEMPTED
            note(f"{getattr(target, 'name', '?')} on {self.tpu}, workers {', '.join(workers)}")
            rc, codes = self._ssh_markers(command, "KELLEN_WORKER_EXIT", stdout_path, stderr_path, True)
        except (LaunchError, OSError) as e:  # OSError: no gcloud, unwritable log
            note(str(e))
            return EXIT_FAILED
        code, problems = aggregate(codes, workers)
        for p in problems:
            note(p)
        note(f"slice exit {code} (gcloud exit {rc})")
        return code


def launcher_from_args(args):
    """TpuVmLauncher for `--tpu NAME --zone Z [--project P]`, else the local launcher."""
    if getattr(args, "tpu", None):
        if not getattr(args, "zone", None):
            raise ValueError("--tpu needs --zone")
        kw = {k: getattr(args, k) for k in ("repo_dir", "python", "commit") if getattr(args, k, None)}
        return TpuVmLauncher(args.tpu, args.zone, getattr(args, "project", None), **kw)
    from kellen.experiments.runs import LocalLauncher

    return LocalLauncher()


# -------------------------------------------------------------------- tmux
def tmux_session_name(session: Optional[str], default_name: Optional[str] = None) -> str:
    """A name given must be a safe word ('.', which tmux cannot take, becomes '_'); the default
    (e.g. the batch's pattern `exp03*`) is made into one: `kellen-exp03`."""
    if session:
        return safe_name(session, "tmux session name").replace(".", "_")
    word = re.sub(r"[^A-Za-z0-9_]+", "-", default_name or "").strip("-_")[:60]
    return word if word.startswith("kellen") else ("kellen-" + word if word else "kellen")


def _strip_tmux_flag(args: Sequence[str], session: Optional[str]) -> List[str]:
    out, skip = [], False
    for i, a in enumerate(args):
        if skip:
            skip = False
        elif a == "--tmux":
            skip = session is not None and i + 1 < len(args) and args[i + 1] == session
        elif not a.startswith("--tmux="):
            out.append(a)
    return out


def _tmux(*args: str) -> List[str]:
    sock = os.environ.get(TMUX_SOCKET_ENV)
    return ["tmux"] + (["-L", safe_name(sock, "tmux socket")] if sock else []) + list(args)


def relaunch_in_tmux(argv: Sequence[str], session: Optional[str] = None, default_name: Optional[str] = None) -> int:
    """Start `argv` (minus --tmux [SESSION]) in a new detached tmux session in the repo root and
    return 0; 2 if the name is bad or taken or tmux is missing. argv is either the whole command
    ([sys.executable, script, args...]) or sys.argv ([script.py, args...]: run with sys.executable).

    The command and the whole environment reach the session through
    a 0600 file that the session's first process reads and deletes: tmux sessions otherwise get the
    tmux *server's* environment, and secrets must not go on a command line (`tmux -e`)."""
    try:
        name = tmux_session_name(session, default_name)
        base = _tmux()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if shutil.which("tmux") is None:
        print("error: --tmux needs tmux on PATH", file=sys.stderr)
        return EXIT_USAGE
    attach = " ".join(base + ["attach", "-t", name])
    if subprocess.run(_tmux("has-session", "-t", f"={name}"), capture_output=True).returncode == 0:
        print(f"error: tmux session {name!r} already exists (attach: {attach}; or pass --tmux OTHER_NAME)",
              file=sys.stderr)
        return EXIT_USAGE
    cmd = _strip_tmux_flag(argv, session)
    if cmd[0].endswith(".py"):
        cmd.insert(0, sys.executable)
    if len(cmd) > 1 and os.path.isfile(cmd[1]):
        cmd[1] = os.path.abspath(cmd[1])  # the session starts in the repo root
    fd, spec = tempfile.mkstemp(prefix="kellen-tmux-", suffix=".json")  # mode 0600
    with os.fdopen(fd, "w") as f:
        json.dump({"cmd": cmd, "cwd": REPO, "env": dict(os.environ)}, f)
    # `new-session -d`: the session belongs to the tmux server, not to this terminal, so it
    # survives logout. remain-on-exit in the same invocation, before the command can end, keeps
    # the pane (and the batch's final table) on screen.
    r = subprocess.run(_tmux("new-session", "-d", "-s", name, "-c", REPO, "-x", "200", "-y", "50",
                             sys.executable, "-m", "kellen.experiments.launchers", "--tmux-exec", spec,
                             ";", "set-option", "-w", "-t", f"={name}:", "remain-on-exit", "on"),
                       capture_output=True, text=True)
    if r.returncode != 0:
        if os.path.exists(spec):
            os.unlink(spec)
        print(f"error: tmux could not start session {name!r}: {r.stderr.strip()}", file=sys.stderr)
        return EXIT_USAGE
    print(f"started tmux session {name}: {' '.join(map(shlex.quote, cmd))}\nattach with: {attach}")
    return EXIT_OK


def _tmux_exec(spec: str) -> int:
    """The session's first process: load the command and environment, delete the file, run it."""
    with open(spec) as f:
        job = json.load(f)
    os.unlink(spec)
    env = dict(job["env"])
    env.update({k: v for k, v in os.environ.items() if k in ("TMUX", "TMUX_PANE")})
    os.chdir(job["cwd"])
    child = subprocess.Popen(job["cmd"], env=env)
    # after the Popen, so the child keeps the default: Ctrl-C in the pane reaches it directly
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: child.send_signal(s))
    rc = child.wait()
    print(f"\n[kellen] exited with code {rc}; this pane stays open (kill it with: tmux kill-session)", flush=True)
    time.sleep(0.5)  # tmux may drop output still in the pty if the pane's process ends at once
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--tmux-exec":
        sys.exit(_tmux_exec(sys.argv[2]))
    sys.exit(f"usage: {sys.argv[0]} --tmux-exec SPEC (used by relaunch_in_tmux)")
