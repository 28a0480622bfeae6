"""storage.blobs: content addressing, idempotence, atomic writes, clear errors."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path

import pytest

import storage.blobs as blobs
from storage import BlobNotFoundError, BlobStore, BlobStoreError


@pytest.fixture()
def store(tmp_path) -> BlobStore:
    return BlobStore(tmp_path / "blobs", chunk_size=4096)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _temp_files(root: Path) -> list[Path]:
    return [p for p in _files(root) if p.name.startswith(blobs.TMP_PREFIX)]


def test_put_bytes_is_content_addressed(store):
    data = b"\x89PNG fake image bytes"
    ref = store.put_bytes(data, ".PNG")
    sha = hashlib.sha256(data).hexdigest()
    assert ref.sha256 == sha and ref.bytes == len(data) and ref.ext == "png"
    assert ref.path == store.root / sha[:2] / sha[2:4] / f"{sha}.png"
    assert ref.relpath == f"{sha[:2]}/{sha[2:4]}/{sha}.png" and store.root / ref.relpath == ref.path
    assert ref.path.read_bytes() == data
    assert store.exists(sha, "png") and not store.exists(sha, "jpg")
    assert store.read_bytes(sha, "png") == data
    with store.open(sha, "png") as fh:
        assert fh.read() == data
    assert store.find(sha) == ref.path
    assert store.ref(sha, "png") == ref


def test_put_is_idempotent(store):
    a = store.put_bytes(b"same", "bin")
    inode = a.path.stat().st_ino
    b = store.put_bytes(b"same", "bin")
    assert a == b
    assert a.path.stat().st_ino == inode  # not rewritten
    assert _files(store.root) == [a.path]


def test_put_file_streams_large_files(store, tmp_path):
    src = tmp_path / "weights.safetensors"
    data = os.urandom(300_000)  # ~73 chunks of 4 KiB
    src.write_bytes(data)
    ref = store.put_file(src)
    assert ref.sha256 == hashlib.sha256(data).hexdigest() and ref.bytes == len(data)
    assert ref.ext == "safetensors" and ref.path.read_bytes() == data
    # Same content via put_bytes or a second put_file: still one blob, no staging leftovers.
    assert store.put_bytes(data, "safetensors") == ref
    assert store.put_file(src) == ref
    assert [p for p in _files(store.root)] == [ref.path]


def test_put_file_extension_from_name(store, tmp_path):
    for name, ext in [("a.JPG", "jpg"), ("noext", "bin"), ("b.png~", "bin")]:
        p = tmp_path / name
        p.write_bytes(name.encode())
        assert store.put_file(p).ext == ext
    assert store.put_file(tmp_path / "noext", ext="txt").path.suffix == ".txt"


def test_put_file_missing_source(store, tmp_path):
    with pytest.raises(BlobStoreError, match="Cannot read"):
        store.put_file(tmp_path / "nope.png")
    assert _temp_files(store.root) == []


def test_concurrent_puts_of_same_content(store):
    data = os.urandom(200_000)
    refs, errors = [], []

    def put() -> None:
        try:
            refs.append(store.put_bytes(data, "png"))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=put) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(refs)) == 1
    assert _files(store.root) == [refs[0].path] and refs[0].path.read_bytes() == data


def test_disk_full_leaves_nothing_behind(store, tmp_path, monkeypatch):
    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(blobs.os, "replace", full)
    data = b"x" * 10_000
    with pytest.raises(BlobStoreError) as exc:
        store.put_bytes(data, "png")
    msg = str(exc.value)
    assert "full" in msg and str(store.root) in msg and "Free some space" in msg
    sha = hashlib.sha256(data).hexdigest()
    assert not store.exists(sha, "png") and _temp_files(store.root) == []

    src = tmp_path / "big.safetensors"
    src.write_bytes(data)
    with pytest.raises(BlobStoreError, match="full"):
        store.put_file(src)
    assert _files(store.root) == []


def test_failure_while_writing_removes_temp_file(store, monkeypatch):
    def fail_fsync(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(blobs.os, "fsync", fail_fsync)
    with pytest.raises(BlobStoreError, match="full"):
        store.put_bytes(b"payload", "png")
    assert _files(store.root) == []


def test_torn_existing_blob_is_rewritten(store):
    data = b"complete content"
    sha = hashlib.sha256(data).hexdigest()
    p = store.path(sha, "png")
    p.parent.mkdir(parents=True)
    p.write_bytes(data[:5])  # e.g. copied in by hand and cut short
    assert store.put_bytes(data, "png").path.read_bytes() == data


def test_unwritable_root_says_what_to_do(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("I am a file")
    store = BlobStore(blocker / "blobs")
    with pytest.raises(BlobStoreError) as exc:
        store.put_bytes(b"data", "png")
    msg = str(exc.value)
    assert str(store.root) in msg and "STUDIO_DATA_DIR" in msg and "not a file" in msg


def test_missing_blob_and_delete(store):
    ref = store.put_bytes(b"to delete", "png")
    other = store.put_bytes(b"kept", "png")
    assert store.delete(ref.sha256, "png") is True
    assert store.delete(ref.sha256, "png") is False
    assert not ref.path.exists() and not ref.path.parent.exists()  # empty fan-out dir removed
    assert other.path.read_bytes() == b"kept"
    with pytest.raises(BlobNotFoundError, match="missing"):
        store.open(ref.sha256, "png")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError for generic callers
        store.read_bytes(ref.sha256, "png")
    assert store.find(ref.sha256) is None


@pytest.mark.parametrize("sha,ext", [("A" * 64, "png"), ("abc", "png"), ("a" * 64, "p/ng"), ("a" * 64, "")])
def test_bad_sha_or_ext_refused(store, sha, ext):
    with pytest.raises(ValueError):
        store.path(sha, ext)
