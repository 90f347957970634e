"""kellen.gcs against a local, patched GCS emulator (fixtures in conftest.py), plus the
emulator's GCS semantics that tensorstore/Orbax depend on, and an Orbax round trip to gs://."""
import json
import os
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest

from kellen import gcs
from tree_helpers import read_tree as _read_tree

# ----------------------------------------------------------------------------- helpers
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _make_tree(root):
    """A small nested tree; returns {relative path: bytes}."""
    rng = np.random.default_rng(0)
    files = {
        "a.bin": rng.bytes(1000),
        "empty.txt": b"",
        "sub/b.npy": rng.bytes(5000),
        "sub/deeper/c.txt": "héllo\n".encode(),
        "sub/dataset.json": json.dumps({"n": 3}).encode(),
    }
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return files


def _delete_all(url):
    bucket, prefix = gcs.split_gcs(url)
    for blob in list(gcs.client().list_blobs(bucket, prefix=prefix + "/")):
        blob.delete()


def _http(url, method="GET", data=None):
    """(status, headers, body) of a raw request to the emulator; HTTP errors are returned too."""
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/octet-stream"} if data is not None else {})
    try:
        with _OPENER.open(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


# ----------------------------------------------------------------------------- url parsing
def test_is_gcs_and_split():
    assert gcs.is_gcs("gs://b-1/x") and not gcs.is_gcs("/data/x") and not gcs.is_gcs(None)
    assert gcs.split_gcs("gs://kellen-test/a/b/") == ("kellen-test", "a/b")
    assert gcs.split_gcs("gs://kellen-test/a/b.json") == ("kellen-test", "a/b.json")
    assert gcs.split_gcs("gs://kellen-test") == ("kellen-test", "")
    assert gcs.split_gcs("gs://kellen-test/") == ("kellen-test", "")


@pytest.mark.parametrize("url", ["gs://", "gs:///x", "gs://Bad_Bucket/x", "/local/dir", "s3://b/x", "gs://a/x"])
def test_split_gcs_rejects_malformed(url):
    with pytest.raises(ValueError) as e:
        gcs.split_gcs(url)
    msg = str(e.value)
    assert repr(url) in msg and "\n" not in msg


@pytest.mark.parametrize("url", ["gs://kellen-test/a/../../etc", "gs://kellen-test/a//b", "gs://kellen-test/./a"])
def test_cached_copy_rejects_paths_that_escape_the_cache(url, tmp_path):
    with pytest.raises(ValueError, match="cannot cache"):
        gcs.cached_copy(url, cache_root=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_missing_client_library_is_a_clear_error(monkeypatch):
    try:
        import google.cloud

        monkeypatch.delattr(google.cloud, "storage", raising=False)
    except ImportError:
        pass
    monkeypatch.setitem(sys.modules, "google.cloud.storage", None)  # makes the import fail
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # a fresh client cache key
    with pytest.raises(RuntimeError, match="pip install google-cloud-storage"):
        gcs.client()


# ----------------------------------------------------------------------------- trees
def test_upload_download_round_trip(gcs_prefix, tmp_path):
    files = _make_tree(tmp_path / "src")
    url = gcs_prefix + "data"
    gcs.upload_tree(str(tmp_path / "src"), url)

    assert gcs.list_files(url) == sorted(files)
    assert gcs.list_files(url + "/sub") == sorted(["b.npy", "dataset.json", "deeper/c.txt"])
    assert gcs.exists(url) and gcs.exists(url + "/") and gcs.exists(url + "/sub/b.npy")
    assert not gcs.exists(url + "/nope") and not gcs.exists(url + "/su")  # no partial-name match

    dest = tmp_path / "out" / "data"
    assert gcs.download_tree(url, str(dest)) == str(dest)
    assert _read_tree(dest) == files
    assert os.listdir(tmp_path / "out") == ["data"]  # no temp dir left beside it

    # Downloading again replaces the old copy whole.
    (dest / "stale.txt").write_text("old")
    gcs.download_tree(url, str(dest))
    assert _read_tree(dest) == files
    assert os.listdir(tmp_path / "out") == ["data"]


def test_download_missing_prefix_raises(gcs_prefix, tmp_path):
    url = gcs_prefix + "does/not/exist"
    with pytest.raises(FileNotFoundError, match=url):
        gcs.download_tree(url, str(tmp_path / "dest"))
    assert not (tmp_path / "dest").exists()
    assert os.listdir(tmp_path) == []


def test_interrupted_download_leaves_nothing(gcs_prefix, tmp_path, monkeypatch):
    _make_tree(tmp_path / "src")
    gcs.upload_tree(str(tmp_path / "src"), gcs_prefix)
    real, calls = gcs._download_file, []

    def flaky(bucket, name, local):
        calls.append(name)
        if len(calls) == 3:
            raise ConnectionError("network went away")
        real(bucket, name, local)

    monkeypatch.setattr(gcs, "_download_file", flaky)
    with pytest.raises(ConnectionError):
        gcs.download_tree(gcs_prefix, str(tmp_path / "out" / "dest"))
    assert os.listdir(tmp_path / "out") == []  # neither dest nor the temp dir


def test_cached_copy_downloads_once(gcs_prefix, tmp_path, monkeypatch):
    files = _make_tree(tmp_path / "src")
    url = gcs_prefix + "ds"
    gcs.upload_tree(str(tmp_path / "src"), url)
    bucket, prefix = gcs.split_gcs(url)
    cache = tmp_path / "cache"

    local = gcs.cached_copy(url, cache_root=str(cache))
    assert local == os.path.join(str(cache), bucket, *prefix.split("/"))
    assert _read_tree(local) == files

    _delete_all(url)  # a second call must not go to GCS at all
    assert not gcs.exists(url)
    assert gcs.cached_copy(url + "/", cache_root=str(cache)) == local
    assert _read_tree(local) == files

    # The default root comes from KELLEN_CACHE.
    monkeypatch.setenv("KELLEN_CACHE", str(cache))
    assert gcs.cached_copy(url) == local


def test_cached_copy_concurrent_callers_download_once(gcs_prefix, tmp_path, monkeypatch):
    files = _make_tree(tmp_path / "src")
    gcs.upload_tree(str(tmp_path / "src"), gcs_prefix)
    real, downloads = gcs.download_tree, []

    def counting(url, dest):
        downloads.append(url)
        return real(url, dest)

    monkeypatch.setattr(gcs, "download_tree", counting)
    results, errors = [], []
    start = threading.Barrier(4)

    def worker():
        try:
            start.wait()
            results.append(gcs.cached_copy(gcs_prefix, cache_root=str(tmp_path / "cache")))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1 and len(downloads) == 1  # the flock serialised them
    assert _read_tree(results[0]) == files


def test_upload_puts_marker_files_last(gcs_prefix, tmp_path, monkeypatch):
    src = tmp_path / "src"
    _make_tree(src)
    (src / "_COMPLETE").write_text("")
    for i in range(20):
        (src / f"shard_{i:02d}.bin").write_bytes(bytes([i]) * 100)
    real, order = gcs._upload_file, []
    lock = threading.Lock()

    def recording(bucket, local, name):
        real(bucket, local, name)
        with lock:
            order.append(name.rsplit("/", 1)[-1] if "/" in name else name)

    monkeypatch.setattr(gcs, "_upload_file", recording)
    gcs.upload_tree(str(src), gcs_prefix + "t")
    assert len(order) == 5 + 1 + 20
    assert order[-2:] == ["dataset.json", "_COMPLETE"]
    assert "dataset.json" not in order[:-2] and "_COMPLETE" not in order[:-2]


def test_failed_upload_never_writes_markers(gcs_prefix, tmp_path, monkeypatch):
    src = tmp_path / "src"
    _make_tree(src)
    real = gcs._upload_file

    def failing(bucket, local, name):
        if name.endswith("a.bin"):
            raise ConnectionError("upload failed")
        real(bucket, local, name)

    monkeypatch.setattr(gcs, "_upload_file", failing)
    with pytest.raises(ConnectionError):
        gcs.upload_tree(str(src), gcs_prefix)
    assert not gcs.exists(gcs_prefix + "sub/dataset.json")


def test_read_write_text(gcs_prefix):
    gcs.write_text(gcs_prefix + "notes/x.txt", "héllo ✓\n")
    assert gcs.read_text(gcs_prefix + "notes/x.txt") == "héllo ✓\n"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        gcs.read_text(gcs_prefix + "missing.txt")


# ----------------------------------------------------------------------------- emulator semantics
def test_emulator_honours_preconditions(gcs_emulator, gcs_prefix):
    bucket, prefix = gcs.split_gcs(gcs_prefix)
    api = f"{gcs_emulator.url}/storage/v1/b/{bucket}/o"
    upload = f"{gcs_emulator.url}/upload/storage/v1/b/{bucket}/o?uploadType=media&name="
    name = prefix + "/obj"
    q = urllib.parse.quote(name, safe="")

    status, _, body = _http(upload + q + "&ifGenerationMatch=0", "POST", b"v1")
    assert status == 200
    gen = json.loads(body)["generation"]
    assert _http(upload + q + "&ifGenerationMatch=0", "POST", b"v2")[0] == 412  # exists now
    assert _http(upload + q + "&ifGenerationMatch=1", "POST", b"v2")[0] == 412

    status, headers, body = _http(f"{api}/{q}?alt=media")
    assert (status, body, headers["x-goog-generation"]) == (200, b"v1", gen)
    assert headers["x-goog-metageneration"] == "1"
    assert _http(f"{api}/{q}?alt=media&ifGenerationNotMatch={gen}")[0] == 304
    assert _http(f"{api}/{q}?alt=media&ifGenerationMatch=1")[0] == 412
    assert _http(f"{api}/{q}?alt=media&ifMetagenerationMatch=2")[0] == 412
    status, _, body = _http(f"{api}/{q}?alt=media&ifGenerationMatch={gen}")
    assert (status, body) == (200, b"v1")
    assert _http(f"{api}/{q}?ifGenerationNotMatch={gen}")[0] == 304  # metadata get
    assert _http(f"{api}/{q}?ifGenerationMatch=1")[0] == 412

    status, _, body = _http(upload + q + f"&ifGenerationMatch={gen}", "POST", b"v2")
    assert status == 200 and json.loads(body)["generation"] != gen
    assert _http(f"{api}/{q}?ifGenerationMatch={gen}", "DELETE")[0] == 412  # stale generation
    assert _http(f"{api}/{q}?alt=media")[2] == b"v2"

    # google-cloud-storage's own precondition path (multipart upload).
    from google.api_core.exceptions import PreconditionFailed

    blob = gcs.client().bucket(bucket).blob(prefix + "/other")
    blob.upload_from_string(b"x", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        blob.upload_from_string(b"y", if_generation_match=0)


def test_emulator_list_offsets(gcs_emulator, gcs_prefix):
    bucket, prefix = gcs.split_gcs(gcs_prefix)
    for k in "abcd":
        gcs.write_text(f"{gcs_prefix}{k}", k)
    names = [b.name[len(prefix) + 1:] for b in gcs.client().list_blobs(
        bucket, start_offset=f"{prefix}/b", end_offset=f"{prefix}/d")]
    assert names == ["b", "c"]


def test_tensorstore_delete_existing_keeps_rest_of_bucket(gcs_emulator, gcs_prefix):
    """The stock emulator ignores list offsets, so this deleted the whole bucket."""
    ts = pytest.importorskip("tensorstore")
    keep = f"gs://{gcs_emulator.bucket}/unrelated-{gcs_prefix.split('/')[3]}/keep.txt"
    gcs.write_text(keep, "keep")
    spec = {"driver": "zarr", "kvstore": gcs_prefix + "arr/"}
    for i in range(2):
        arr = ts.open(spec, create=True, delete_existing=True, dtype=ts.float32, shape=[4]).result()
        arr.write(np.arange(4, dtype=np.float32) + i).result()
    np.testing.assert_array_equal(arr.read().result(), np.arange(4) + 1)
    assert gcs.read_text(keep) == "keep"


# ----------------------------------------------------------------------------- orbax
def test_orbax_checkpoint_manager_on_gcs(gcs_emulator, gcs_prefix):
    pytest.importorskip("gcsfs", reason="Orbax reaches gs:// paths through etils.epath -> gcsfs")
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    keep = f"gs://{gcs_emulator.bucket}/unrelated-{gcs_prefix.split('/')[3]}/keep.txt"
    gcs.write_text(keep, "written before the saves")
    path = gcs_prefix + "ckpt"

    def tree(step):
        return {"w": jnp.arange(6.0).reshape(2, 3) * step, "b": {"n": jnp.full((4,), step, jnp.int32)}}

    options = ocp.CheckpointManagerOptions(max_to_keep=3)  # also exercises deletes on GCS
    with ocp.CheckpointManager(path, options=options) as mngr:
        for step in range(5):
            mngr.save(step, args=ocp.args.StandardSave(tree(step)))
        mngr.wait_until_finished()
        assert mngr.all_steps() == [2, 3, 4]

    # A fresh manager sees only what is on "GCS".
    with ocp.CheckpointManager(path, options=options) as mngr:
        assert mngr.all_steps() == [2, 3, 4] and mngr.latest_step() == 4
        restored = mngr.restore(4, args=ocp.args.StandardRestore(tree(0)))
    np.testing.assert_array_equal(restored["w"], np.arange(6.0).reshape(2, 3) * 4)
    np.testing.assert_array_equal(restored["b"]["n"], np.full((4,), 4))
    assert gcs.read_text(keep) == "written before the saves"
    assert {f.split("/")[0] for f in gcs.list_files(path)} == {"2", "3", "4"}
