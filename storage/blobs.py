"""Content-addressed file store for images, LoRA weights and checkpoints.

A blob lives at `root/ab/cd/<sha256>.<ext>` (ab, cd: the first hex digits of its sha256), so the
same content is stored once and a path never changes meaning. Writes are atomic: data goes to a
temporary file on the same filesystem, is fsynced, then renamed into place with `os.replace`,
so a crash leaves either the whole blob or none of it (plus, at worst, a stray `.tmp-*` file).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

SHA256_RE = re.compile(r"[0-9a-f]{64}")
EXT_RE = re.compile(r"[a-z0-9]{1,16}(\.[a-z0-9]{1,8})?")  # "png", "safetensors", "tar.gz"
TMP_DIR = ".tmp"  # staging area of put_file (under root: same filesystem, so renames are atomic)
TMP_PREFIX = ".tmp-"
DEFAULT_CHUNK = 1 << 20
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # no space left, or over quota


class BlobStoreError(RuntimeError):
    """The blob store cannot do what was asked; the message says what to do."""


class BlobNotFoundError(BlobStoreError, FileNotFoundError):
    """No blob with that sha256 and extension."""


@dataclass(frozen=True)
class BlobRef:
    """A stored blob: its sha256, absolute path and size in bytes."""

    sha256: str
    path: Path
    bytes: int
    ext: str

    @property
    def relpath(self) -> str:
        """Path relative to the blob root, as stored in the database (POSIX separators)."""
        return blob_relpath(self.sha256, self.ext)


def normalize_ext(ext: str) -> str:
    ext = ext.lower().lstrip(".")
    if not EXT_RE.fullmatch(ext):
        raise ValueError(f"bad blob extension {ext!r}: use letters/digits like 'png' or 'safetensors'")
    return ext


def check_sha(sha: str) -> str:
    if not SHA256_RE.fullmatch(sha):
        raise ValueError(f"not a lowercase hex sha256: {sha!r}")
    return sha


def blob_relpath(sha: str, ext: str) -> str:
    sha, ext = check_sha(sha), normalize_ext(ext)
    return f"{sha[:2]}/{sha[2:4]}/{sha}.{ext}"


class BlobStore:
    """Content-addressed files under `root` (created on first write)."""

    def __init__(self, root: Path, chunk_size: int = DEFAULT_CHUNK) -> None:
        self.root = Path(root).expanduser().absolute()
        self.chunk_size = chunk_size

    def __repr__(self) -> str:
        return f"BlobStore({str(self.root)!r})"

    # -- reading ---------------------------------------------------------------------------
    def path(self, sha: str, ext: str) -> Path:
        return self.root / blob_relpath(sha, ext)

    def exists(self, sha: str, ext: str) -> bool:
        return self.path(sha, ext).is_file()

    def find(self, sha: str) -> Path | None:
        """The blob with this sha256 whatever its extension, or None."""
        sha = check_sha(sha)
        d = self.root / sha[:2] / sha[2:4]
        return next((p for p in sorted(d.glob(f"{sha}.*")) if p.is_file()), None)

    def open(self, sha: str, ext: str) -> BinaryIO:
        p = self.path(sha, ext)
        try:
            return p.open("rb")
        except FileNotFoundError as e:
            raise BlobNotFoundError(
                f"The stored file {sha[:12]}….{ext} is missing from {self.root}. It may have been deleted "
                "by hand; re-upload it or restore the data folder from a backup."
            ) from e

    def read_bytes(self, sha: str, ext: str) -> bytes:
        with self.open(sha, ext) as fh:
            return fh.read()

    def ref(self, sha: str, ext: str) -> BlobRef:
        p = self.path(sha, ext)
        if not p.is_file():
            raise BlobNotFoundError(f"No stored file {sha[:12]}….{ext} in {self.root}.")
        return BlobRef(sha, p, p.stat().st_size, normalize_ext(ext))

    # -- writing ---------------------------------------------------------------------------
    def put_bytes(self, data: bytes, ext: str) -> BlobRef:
        ext = normalize_ext(ext)
        sha = hashlib.sha256(data).hexdigest()
        dest = self.path(sha, ext)
        if not _same_size(dest, len(data)):
            self._mkdir(dest.parent)
            self._write_atomic(dest.parent, dest, (data,), len(data))
        return BlobRef(sha, dest, len(data), ext)

    def put_file(self, src: Path, ext: str | None = None) -> BlobRef:
        """Store a copy of `src` (read once, in chunks: multi-GB files are fine)."""
        src = Path(src)
        if ext is None:  # from the file name; odd suffixes ("photo.jpeg~") are stored as .bin
            ext = src.suffix.lower().lstrip(".")
            ext = ext if EXT_RE.fullmatch(ext) else "bin"
        ext = normalize_ext(ext)
        staging = self.root / TMP_DIR
        self._mkdir(staging)
        hasher = hashlib.sha256()
        size = 0

        try:
            fh = src.open("rb")
        except OSError as e:
            raise BlobStoreError(
                f"Cannot read {src}: {e.strerror}. Check the file exists and is readable."
            ) from e

        def chunks() -> Iterable[bytes]:
            nonlocal size
            while True:
                try:
                    chunk = fh.read(self.chunk_size)
                except OSError as e:
                    raise BlobStoreError(f"Reading {src} failed: {e.strerror}.") from e
                if not chunk:
                    return
                hasher.update(chunk)
                size += len(chunk)
                yield chunk

        with fh:
            tmp: Path | None = self._write_atomic(staging, None, chunks(), None)
        try:
            sha = hasher.hexdigest()
            dest = self.path(sha, ext)
            if _same_size(dest, size):
                return BlobRef(sha, dest, size, ext)
            self._mkdir(dest.parent)
            self._replace(tmp, dest, size)
            tmp = None
            return BlobRef(sha, dest, size, ext)
        finally:
            if tmp is not None:
                _unlink_quiet(tmp)

    def delete(self, sha: str, ext: str) -> bool:
        """Remove a blob; True if it existed. Empty fan-out folders are tidied away."""
        p = self.path(sha, ext)
        try:
            p.unlink()
        except FileNotFoundError:
            return False
        except OSError as e:
            raise self._error(e, "delete a file from") from e
        for d in (p.parent, p.parent.parent):
            try:
                d.rmdir()
            except OSError:
                break
        return True

    # -- internals -------------------------------------------------------------------------
    def _mkdir(self, d: Path) -> None:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._error(e, "create a folder in") from e

    def _write_atomic(
        self, tmp_dir: Path, dest: Path | None, chunks: Iterable[bytes], size: int | None
    ) -> Path:
        """Write `chunks` to a temp file in `tmp_dir`, fsync it, and rename it to `dest`.

        With `dest=None` the fsynced temp file is returned for the caller to place.
        """
        tmp: Path | None = None
        try:
            fd, name = tempfile.mkstemp(dir=tmp_dir, prefix=TMP_PREFIX, suffix=".part")
            tmp = Path(name)
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; blobs are plain readable files
            if dest is None:
                return tmp
            self._replace(tmp, dest, size)
            return dest
        except BaseException as e:
            if tmp is not None:
                _unlink_quiet(tmp)  # never leave a partial file behind
            if isinstance(e, OSError):
                raise self._error(e, "save a file in", size) from e
            raise

    def _replace(self, tmp: Path, dest: Path, size: int | None) -> None:
        try:
            os.replace(tmp, dest)
        except OSError as e:
            raise self._error(e, "save a file in", size) from e
        _fsync_dir(dest.parent)

    def _error(self, e: OSError, doing: str, size: int | None = None) -> BlobStoreError:
        if e.errno in DISK_FULL_ERRNOS:
            need = f" ({size / 1e6:.1f} MB)" if size else ""
            return BlobStoreError(
                f"The disk holding the studio's file store ({self.root}) is full: could not {doing} it"
                f"{need}. Free some space (for example delete old runs and checkpoints) or move the "
                "studio data folder (STUDIO_DATA_DIR) to a bigger disk, then try again."
            )
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST):
            return BlobStoreError(
                f"The studio cannot {doing} its file store at {self.root} ({e.strerror}: {e.filename}). "
                "Make sure that folder exists, is a folder (not a file), is not read-only, and belongs to "
                "the user running the studio; or set STUDIO_DATA_DIR to a folder you can write to."
            )
        return BlobStoreError(f"The studio could not {doing} its file store at {self.root}: {e}.")


def _same_size(p: Path, size: int) -> bool:
    """Already stored? Same sha256 path and same size (a torn file could not have been renamed in)."""
    try:
        return p.stat().st_size == size
    except OSError:
        return False


def _unlink_quiet(p: Path) -> None:
    try:
        p.unlink()
    except OSError:
        pass


def _fsync_dir(d: Path) -> None:
    """Make the rename itself durable (POSIX); best effort elsewhere."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
