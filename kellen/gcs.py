"""Small Google Cloud Storage helpers: gs:// urls, whole-tree copies, text objects.

Datasets may live at ``gs://bucket/prefix``; training memory-maps local files, so
:func:`cached_copy` brings a tree to local disk once per host and reuses it afterwards.
Checkpoint code and results download use the same tree copies.

``google-cloud-storage`` is imported lazily (it is slow to import and only needed for
gs:// paths). With ``STORAGE_EMULATOR_HOST`` set (tests, local emulators) the client is
anonymous with project ``test``; otherwise it uses the default Google credentials.
"""
from __future__ import annotations

import fcntl
import functools
import glob
import os
import re
import shutil
import tempfile
from typing import Dict, Optional
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

THREADS = 8
# Readers key on these files to know that a tree is whole, so they are uploaded last.
MARKER_FILES = ("dataset.json", "_COMPLETE")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def is_gcs(path) -> bool:
    return isinstance(path, str) and path.startswith("gs://")


def split_gcs(url: str) -> tuple[str, str]:
    """``gs://bucket/a/b/`` -> ``("bucket", "a/b")`` (prefix without surrounding slashes)."""
    if not is_gcs(url):
        raise ValueError(f"not a gs:// url: {url!r}")
    bucket, _, prefix = url[len("gs://"):].partition("/")
    if not _BUCKET_RE.match(bucket):
        raise ValueError(f"malformed GCS url {url!r}: expected gs://<bucket>/<path> with a valid bucket name")
    return bucket, prefix.strip("/")


def _storage():
    try:
        from google.cloud import storage
    except ImportError as e:
        raise RuntimeError("gs:// paths need google-cloud-storage: pip install google-cloud-storage") from e
    return storage


def client():
    """A shared ``google.cloud.storage.Client`` (one per emulator setting, so tests that
    point ``STORAGE_EMULATOR_HOST`` somewhere get a client that goes there)."""
    return _client_for(os.environ.get("STORAGE_EMULATOR_HOST") or None)


@functools.lru_cache(maxsize=None)
def _client_for(emulator_host):
    storage = _storage()
    if emulator_host:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(credentials=AnonymousCredentials(), project="test")
    from google.auth.exceptions import DefaultCredentialsError

    try:
        return storage.Client()
    except DefaultCredentialsError:  # no credentials at all: public buckets still read
        return storage.Client.create_anonymous_client()


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a gs:// url or a local path alike."""
    if is_gcs(base):
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def local_path(root: str, rel: str, url: str = "gs://") -> str:
    """``root/rel`` for the object ``url/rel``; refuses names that would land outside ``root``
    (``..``, absolute)."""
    local = os.path.normpath(os.path.join(root, rel))
    if ".." in rel.split("/") or not local.startswith(root.rstrip(os.sep) + os.sep):
        raise ValueError(f"refusing to download {url.rstrip('/')}/{rel}: it would land outside {root}")
    return local


def _dir_prefix(prefix: str) -> str:
    # "a/b" lists "a/b/..." only, never the sibling "a/bc".
    return prefix + "/" if prefix else ""


def list_files(url: str) -> list[str]:
    """Paths, relative to the url, of every object under it (recursively), sorted."""
    bucket, prefix = split_gcs(url)
    base = _dir_prefix(prefix)
    names = (b.name[len(base):] for b in client().list_blobs(bucket, prefix=base))
    return sorted(n for n in names if n and not n.endswith("/"))  # skip "folder" placeholders


def list_dirs(url: str) -> list[str]:
    """Names of the immediate "sub-directories" under the url (common prefixes), sorted."""
    bucket, prefix = split_gcs(url)
    base = _dir_prefix(prefix)
    pages = client().list_blobs(bucket, prefix=base, delimiter="/").pages
    found = {p[len(base):].strip("/") for page in pages for p in page.prefixes}
    return sorted(n for n in found if n)


def exists(url: str) -> bool:
    """True if the url names an object, or any object lies under it."""
    bucket, prefix = split_gcs(url)
    if prefix and client().bucket(bucket).blob(prefix).exists():
        return True
    return any(True for _ in client().list_blobs(bucket, prefix=_dir_prefix(prefix), max_results=1))


def _parallel(fn, items) -> None:
    """fn(item) for each item on a thread pool; the first error cancels the rest and is raised."""
    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(fn, it) for it in items]
        wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            f.cancel()
        for f in futures:
            if f.done() and not f.cancelled() and f.exception() is not None:
                raise f.exception()


def _download_file(bucket, name: str, local: str) -> None:
    bucket.blob(name).download_to_filename(local)


def _upload_file(bucket, local: str, name: str) -> None:
    bucket.blob(name).upload_from_filename(local)


def download_tree(url: str, dest: str) -> str:
    """Copy every object under ``url`` into the local directory ``dest`` (relative paths kept).

    The files go to a hidden sibling temp dir first, renamed to ``dest`` at the end, so an
    interrupted download never leaves a partial ``dest``. An existing ``dest`` is replaced.
    """
    bucket_name, prefix = split_gcs(url)
    rels = list_files(url)
    if not rels:
        raise FileNotFoundError(f"no objects under {url}")
    dest = os.path.abspath(dest)
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.partial-", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the renamed copy should read like a normal dir
        jobs = []
        for rel in rels:
            local = local_path(tmp, rel, url)  # an object name like "../x" must not escape
            os.makedirs(os.path.dirname(local), exist_ok=True)
            jobs.append((_dir_prefix(prefix) + rel, local))
        bucket = client().bucket(bucket_name)
        _parallel(lambda job: _download_file(bucket, *job), jobs)
        if os.path.lexists(dest):  # swap out the old copy; rename cannot replace a full dir
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.old-", dir=parent)
            os.rename(dest, os.path.join(old, "x"))
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def default_cache_root() -> str:
    return os.environ.get("KELLEN_CACHE") or os.path.expanduser("~/.cache/kellen")


def cached_copy(url: str, cache_root: str | None = None) -> str:
    """Local path of a cached copy of the tree at ``url``: ``<cache_root>/<bucket>/<prefix>``.

    Downloads only when that directory is absent; because :func:`download_tree` renames a
    finished download into place, "present" means "complete". A lock file serialises the
    check-and-download between processes on one host.
    """
    bucket, prefix = split_gcs(url)
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ValueError(f"cannot cache {url!r}: empty, '.' or '..' path segments")
    root = cache_root or default_cache_root()
    local = os.path.join(root, bucket, *prefix.split("/")) if prefix else os.path.join(root, bucket)
    if os.path.isdir(local):
        return local
    # Locks live outside the data tree so they never end up inside a cached copy.
    lock_path = os.path.join(root, ".locks", bucket, (prefix or "_bucket_") + ".lock")
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not os.path.isdir(local):
                # We hold the lock: temp dirs left by a killed download of this path are stale.
                for stale in glob.glob(os.path.join(os.path.dirname(local), f".{os.path.basename(local)}.partial-*")):
                    shutil.rmtree(stale, ignore_errors=True)
                download_tree(url, local)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return local


def upload_tree(src: str, url: str, changed: Optional[Dict[str, tuple]] = None) -> None:
    """Upload every file under the local directory ``src`` to the prefix ``url``.

    Files named ``dataset.json`` or ``_COMPLETE`` go last, one by one, after all the others
    have succeeded, so a reader keyed on them never sees a partial tree. With ``changed`` (a
    dict the caller keeps between calls: path -> (mtime_ns, size) at its last upload), files
    unchanged since their last upload are skipped.
    """
    if not os.path.isdir(src):
        raise FileNotFoundError(f"not a directory: {src}")
    bucket_name, prefix = split_gcs(url)
    rest, last, seen = [], [], {}
    for root, _dirs, files in os.walk(src):
        for f in sorted(files):
            local = os.path.join(root, f)
            if changed is not None:
                st = os.stat(local)
                seen[local] = (st.st_mtime_ns, st.st_size)
                if changed.get(local) == seen[local]:
                    continue
            name = _dir_prefix(prefix) + os.path.relpath(local, src).replace(os.sep, "/")
            (last if f in MARKER_FILES else rest).append((local, name))
    bucket = client().bucket(bucket_name)
    _parallel(lambda job: _upload_file(bucket, *job), rest)
    for local, name in sorted(last, key=lambda j: (MARKER_FILES.index(os.path.basename(j[0])), j[1])):
        _upload_file(bucket, local, name)
    if changed is not None:
        changed.update(seen)


def read_text(url: str) -> str:
    bucket, name = split_gcs(url)
    blob = client().bucket(bucket).blob(name)
    from google.api_core.exceptions import NotFound  # importable once client() worked

    try:
        return blob.download_as_bytes().decode("utf-8")
    except NotFound:
        raise FileNotFoundError(f"no object at {url}") from None


def write_text(url: str, text: str) -> None:
    bucket, name = split_gcs(url)
    if not name:
        raise ValueError(f"{url!r} names a bucket, not an object")
    client().bucket(bucket).blob(name).upload_from_string(text.encode("utf-8"), content_type="text/plain; charset=utf-8")
