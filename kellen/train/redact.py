"""Keep secrets out of every file a run writes (config, metadata, logs, reproduce.sh, FAILED.txt).

Three kinds of secret reach a run: API keys and tokens in the environment (WANDB_API_KEY, ...),
Google credentials (the GOOGLE_APPLICATION_CREDENTIALS path and the key material in that file),
and credentials inside URLs (`https://user:token@host`, `?token=...`). `redact(text)` removes the
values it can find from all three; `environment()` is a redacted capture of the variables that
matter for reproducing a run.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Iterable, List, Optional

MASK = "<redacted>"
# Environment names whose values are secrets, whatever they contain.
SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH|COOKIE|SESSION)", re.I)
# Variables worth recording for a rerun (after redaction).
CAPTURE_PREFIXES = ("XLA_", "JAX_", "TPU_", "KELLEN_", "WANDB_", "TF_CPP_", "CUDA_", "LIBTPU_", "NCCL_",
                    "MEGASCALE_", "GOOGLE_", "GCS_", "STORAGE_EMULATOR_HOST", "TENSORSTORE_")
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s'\"]+)@")
_URL_QUERY_SECRET = re.compile(
    r"(?P<key>[?&](?:access_token|token|key|api_key|apikey|sig|signature|secret|password|X-Goog-Signature|"
    r"X-Goog-Credential)=)(?P<value>[^&\s'\"]+)", re.I)
# Fields of a service-account JSON (or any JSON) that hold key material.
_JSON_SECRET = re.compile(r'("(?:private_key|private_key_id|client_secret|refresh_token|access_token)"\s*:\s*)'
                          r'"(?:[^"\\]|\\.)*"')


def _credential_values(env) -> List[str]:
    """The credentials file's path and every string value inside it (key ids, PEM keys, emails)."""
    path = env.get("GOOGLE_APPLICATION_CREDENTIALS")
    if not path:
        return []
    values = [path]
    try:
        with open(os.path.expanduser(path)) as f:
            text = f.read()
    except OSError:
        return values
    values.append(text)
    try:
        data = json.loads(text)
    except ValueError:
        return values
    if isinstance(data, dict):
        for k, v in data.items():
            if isinstance(v, str) and len(v) >= 8 and k not in ("type", "universe_domain"):
                values.append(v)
                values.extend(line for line in v.splitlines() if len(line) >= 16)  # PEM body lines
    return values


# Values too common to scrub from text even when a secret-looking variable holds them.
_PLAIN = {"true", "false", "none", "null", "disabled", "enabled", "offline", "online", "localhost"}


def secret_values(env=None) -> List[str]:
    """Every literal secret this process can see, longest first (so substrings go last)."""
    env = os.environ if env is None else env
    values = [v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= 8 and v.lower() not in _PLAIN]
    values += _credential_values(env)
    return sorted({v for v in values if v}, key=len, reverse=True)


def redact(text: str, env=None, extra: Iterable[str] = ()) -> str:
    """`text` with every known secret value, URL credential and JSON key field replaced by MASK."""
    if not text:
        return text
    for value in list(extra) + secret_values(env):
        if value and value in text:
            text = text.replace(value, MASK)
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    text = _URL_QUERY_SECRET.sub(lambda m: f"{m.group('key')}{MASK}", text)
    return _JSON_SECRET.sub(lambda m: f'{m.group(1)}"{MASK}"', text)


def redact_obj(obj, env=None):
    """redact() applied to every string inside a JSON-like structure (keys kept)."""
    if isinstance(obj, str):
        return redact(obj, env)
    if isinstance(obj, dict):
        return {k: redact_obj(v, env) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v, env) for v in obj]
    return obj


def environment(env=None) -> Dict[str, str]:
    """The run-relevant environment, secrets masked: names kept so a rerun knows what was set."""
    env = os.environ if env is None else env
    out: Dict[str, str] = {}
    for k in sorted(env):
        if not k.startswith(CAPTURE_PREFIXES):
            continue
        out[k] = MASK if SECRET_NAME.search(k) or k == "GOOGLE_APPLICATION_CREDENTIALS" else redact(env[k], env)
    return out


def find_secrets(root: str, secrets: Iterable[str]) -> Optional[str]:
    """The first file under `root` that contains any of `secrets` (binary search), or None."""
    needles = [s.encode() for s in secrets if s]
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if any(n in data for n in needles):
                return path
    return None
