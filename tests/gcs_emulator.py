"""A local GCS for tests: ``gcp-storage-emulator`` with the conditional-request semantics
that tensorstore (and so Orbax) rely on, run as a subprocess on a loopback port.

The stock emulator ignores ``ifGenerationMatch`` / ``ifGenerationNotMatch`` /
``ifMetagenerationMatch``, sends no ``x-goog-generation`` header with media downloads and
ignores ``startOffset`` / ``endOffset`` on list. Unpatched, Orbax fails about one save in ten
and a tensorstore ``delete_existing`` (a DeleteRange = list by offsets, then delete each)
deletes the whole bucket. The patches below follow the GCS JSON API (and tensorstore's own
mock of it):

* media download and object metadata get: ``x-goog-generation`` / ``x-goog-metageneration``
  headers; ifGenerationMatch / ifMetagenerationMatch failing -> 412, ifGenerationNotMatch
  holding -> 304;
* insert (media, multipart, resumable start): ifGenerationMatch (0 = must not exist) -> 412;
* delete and metadata patch: the same preconditions -> 412;
* list: startOffset (inclusive) / endOffset (exclusive).

It also raises the listen backlog: the emulator serves one request at a time and the
socketserver default backlog of 5 makes a burst of parallel clients wait out SYN retries.

Run as a script it takes the emulator's own CLI, e.g.
``python tests/gcs_emulator.py start --host 127.0.0.1 --port 9023 --in-memory -q``.
In tests use :func:`start_emulator`.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http import HTTPStatus

HOST = "127.0.0.1"


# ----------------------------------------------------------------------------- patches
# (run inside the emulator process only; they must be applied before
# gcp_storage_emulator.server is imported, because its route table captures the handler
# functions at import time)

def _param(request, name):
    values = request.query.get(name)
    return values[0] if values else None


def _check_preconditions(request, response, storage, bucket, name, *, read):
    """True if the request may go ahead; otherwise sets the status GCS would and returns False.

    ``read``: a GET, where a holding ifGenerationNotMatch means 304 Not Modified (for
    writes GCS answers 412)."""
    from gcp_storage_emulator.exceptions import NotFound

    try:
        obj = storage.get_file_obj(bucket, name)
    except NotFound:
        obj = None
    gen = str(obj["generation"]) if obj else "0"  # generation 0 == "does not exist"
    meta = str(obj.get("metageneration", "1")) if obj else None
    if_gen = _param(request, "ifGenerationMatch")
    if_not_gen = _param(request, "ifGenerationNotMatch")
    if_meta = _param(request, "ifMetagenerationMatch")
    if_not_meta = _param(request, "ifMetagenerationNotMatch")
    if obj is None and read and if_gen not in (None, "0"):
        response.status = HTTPStatus.PRECONDITION_FAILED
        return False
    if obj is None and read:
        return True  # the handler answers 404
    if if_gen is not None and if_gen != gen:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return False
    if if_meta is not None and if_meta != meta:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return False
    if obj is not None and if_not_gen is not None and if_not_gen == gen:
        if read:
            response.status = HTTPStatus.NOT_MODIFIED
            response["x-goog-generation"] = gen
        else:
            response.status = HTTPStatus.PRECONDITION_FAILED
        return False
    if obj is not None and if_not_meta is not None and if_not_meta == meta:
        response.status = HTTPStatus.NOT_MODIFIED if read else HTTPStatus.PRECONDITION_FAILED
        return False
    return True


def _upload_name(request):
    """Object name of an insert request: ``?name=`` wins over the JSON metadata."""
    name = _param(request, "name")
    if name is not None:
        return name
    kind = _param(request, "uploadType")
    try:
        if kind == "multipart":
            return request.data["meta"].get("name")
        if kind == "resumable" and isinstance(request.data, dict):
            return request.data.get("name")
    except (KeyError, TypeError, AttributeError):
        pass
    return None


def apply_patches():
    from gcp_storage_emulator.handlers import objects

    orig_download, orig_get, orig_insert = objects.download, objects.get, objects.insert
    orig_ls, orig_delete, orig_patch = objects.ls, objects.delete, objects.patch

    def download(request, response, storage, *args, **kwargs):
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        if not _check_preconditions(request, response, storage, bucket, name, read=True):
            return None
        try:
            obj = storage.get_file_obj(bucket, name)
        except Exception:  # missing: the original answers 404
            obj = None
        if obj is not None:
            # tensorstore takes a ranged read's generation from these headers.
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
            response["x-goog-stored-content-length"] = str(obj.get("size"))
        return orig_download(request, response, storage, *args, **kwargs)

    def get(request, response, storage, *args, **kwargs):
        if _param(request, "alt") == "media":
            return download(request, response, storage, *args, **kwargs)
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        if not _check_preconditions(request, response, storage, bucket, name, read=True):
            return None
        return orig_get(request, response, storage, *args, **kwargs)

    def insert(request, response, storage, *args, **kwargs):
        name = _upload_name(request)
        bucket = request.params["bucket_name"]
        if name is not None and not _check_preconditions(
                request, response, storage, bucket, name, read=False):
            return None
        return orig_insert(request, response, storage, *args, **kwargs)

    def delete(request, response, storage, *args, **kwargs):
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        if not _check_preconditions(request, response, storage, bucket, name, read=False):
            return None
        return orig_delete(request, response, storage, *args, **kwargs)

    def patch(request, response, storage, *args, **kwargs):
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        if not _check_preconditions(request, response, storage, bucket, name, read=False):
            return None
        return orig_patch(request, response, storage, *args, **kwargs)

    def ls(request, response, storage, *args, **kwargs):
        start, end = _param(request, "startOffset"), _param(request, "endOffset")
        if start is None and end is None:
            return orig_ls(request, response, storage, *args, **kwargs)

        def in_range(name):
            return (start is None or name >= start) and (end is None or name < end)

        # Filter what the original handler would send, by wrapping response.json.
        send = response.json

        def filtered(body):
            body = dict(body)
            body["items"] = [o for o in body.get("items") or [] if in_range(o["name"])]
            body["prefixes"] = [p for p in body.get("prefixes") or [] if in_range(p)]
            return send(body)

        response.json = filtered
        try:
            return orig_ls(request, response, storage, *args, **kwargs)
        finally:
            response.json = send

    objects.download, objects.get, objects.insert = download, get, insert
    objects.ls, objects.delete, objects.patch = ls, delete, patch

    import http.server
    http.server.HTTPServer.request_queue_size = 128


def _main(argv):
    apply_patches()
    from gcp_storage_emulator.__main__ import main  # imports server -> patched routes

    return main(argv)


# ----------------------------------------------------------------------------- test side

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# Never route loopback requests through a proxy that the environment may name.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Emulator:
    url: str
    process: subprocess.Popen
    log_path: str
    env: dict = field(default_factory=dict)

    def create_bucket(self, name: str) -> None:
        body = json.dumps({"name": name}).encode()
        req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
        with _OPENER.open(req, timeout=30) as r:
            r.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        with _OPENER.open(url + "/", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_emulator(tmp_dir, timeout: float = 60.0, attempts: int = 3) -> Emulator:
    """Start the patched emulator (in-memory) on a free loopback port and wait until it
    answers. Its output goes to ``<tmp_dir>/gcs_emulator.log``. The caller must ``stop()``."""
    os.makedirs(tmp_dir, exist_ok=True)
    log_path = os.path.join(str(tmp_dir), "gcs_emulator.log")
    for _attempt in range(attempts):  # the free port may be taken before the child binds it
        port = _free_port()
        url = f"http://{HOST}:{port}"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "start", "--host", HOST,
                 "--port", str(port), "--in-memory", "-q"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: stop() kills it whole
            )
        emu = Emulator(url=url, process=proc, log_path=log_path, env={
            "STORAGE_EMULATOR_HOST": url,
            "TENSORSTORE_GCS_HTTP_URL": url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            # No credential discovery: it would ask the GCE metadata server, off loopback.
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore: use this token
            "NO_GCE_CHECK": "true",  # google-auth and gcsfs: skip the GCE probe
            "FSSPEC_GCS_TOKEN": "anon",  # gcsfs (epath's gs:// backend): anonymous
        })
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(url):
                return emu
            time.sleep(0.1)
        emu.stop()
    with open(log_path, errors="replace") as f:
        tail = f.read()[-2000:]
    raise RuntimeError(f"GCS emulator did not start; log tail:\n{tail}")


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
