"""Read an effect's pair set (source -> target images, optional captions) from a folder or a zip.

Accepted layouts (a zip may hold any of them, also inside one top-level folder):

(a) pairs matched by name in one folder::

        cat_01_source.png  cat_01_target.png      (suffix pair)
        cat_02.jpg         cat_02_target.jpg      (a plain name is the source)

    source suffixes: ``_source _src _before _input _control``
    target suffixes: ``_target _tgt _after _output _result``
    (``-`` works as separator too, case does not matter).
(b) ``source/`` (or ``sources/``, ``src/``) + ``target/`` (or ``targets/``, ``tgt/``) folders
    whose files match by name without extension (``source/a.jpg`` pairs with ``target/a.png``).
(c) ai-toolkit's layout: ``control/`` + ``targets/`` (``target/`` is accepted too).

Captions are ``.txt`` files with the same name as an image: next to the target (ai-toolkit's
convention, preferred) or next to the source. Hidden files, ``__MACOSX/``, ``Thumbs.db``,
``desktop.ini`` and tool cache folders such as ai-toolkit's ``_latent_cache/`` are ignored.

``read_pairset`` writes nothing to disk and never extracts a zip: every file is read into memory
with hard bounds (file size, archive size and entry count, total bytes actually decompressed,
image pixels checked from the header before decoding). It collects every problem it finds and
raises one ``PairSetError`` listing them all, so a curator can fix a set in one go.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps

MB = 1024 * 1024

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CAPTION_EXTENSIONS = (".txt",)
SOURCE_SUFFIXES = ("source", "src", "before", "input", "control")
TARGET_SUFFIXES = ("target", "tgt", "after", "output", "result")
SOURCE_DIRS = ("source", "sources", "src", "control")
TARGET_DIRS = ("target", "targets", "tgt")
IGNORED_NAMES = ("__macosx", "thumbs.db", "desktop.ini")
# Tool caches beside the images, e.g. ai-toolkit's `_latent_cache/`.
_CACHE_DIR = re.compile(r"^_.*_cache$", re.IGNORECASE)
_SUFFIX = re.compile(
    r"^(?P<base>.+?)[_-](?P<suffix>" + "|".join(SOURCE_SUFFIXES + TARGET_SUFFIXES) + r")$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class PairSetLimits:
    """Bounds that keep a bad or hostile upload from exhausting memory or time."""

    min_side: int = 32
    max_side: int = 8192
    max_pixels: int = 36_000_000  # per image; checked from the header, before decoding
    max_total_pixels: int = 600_000_000  # all images held in memory together (~1.8 GB RGB)
    max_file_bytes: int = 25 * MB
    max_caption_bytes: int = 64 * 1024
    max_archive_bytes: int = 500 * MB  # the .zip file itself
    max_archive_entries: int = 5000
    max_total_bytes: int = 1024 * MB  # all files together, as actually read (zip: uncompressed)
    max_pairs: int = 500
    min_pairs: int = 1


@dataclass
class LoadedPair:
    """One training pair, decoded to RGB, with canonical PNG bytes for the blob store."""

    name: str
    source: Image.Image
    target: Image.Image
    caption: str | None
    source_bytes: bytes
    target_bytes: bytes
    original_source_name: str
    original_target_name: str


@dataclass
class PairSet:
    pairs: list[LoadedPair]
    warnings: list[str] = field(default_factory=list)


class PairSetError(ValueError):
    """A pair set that cannot be imported; ``problems`` lists every reason, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"The pair set cannot be imported ({n} problem{'s' if n != 1 else ''}):"
        super().__init__("\n".join([head, *(f"- {p}" for p in self.problems)]))


# ---------------------------------------------------------------------------------------------
# Files: one small view over a folder or a zip, so layouts and validation do not care which.


@dataclass
class _File:
    path: PurePosixPath  # relative to the set's root, "/"-separated
    display: str  # the name a curator recognises (path inside the folder or zip)
    read: Callable[[], bytes]  # bounded; raises _ReadError with a curator message


class _ReadError(Exception):
    pass


class _Budget:
    """Counts bytes actually read across all files (zip bombs can lie about declared sizes)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.exceeded = False

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            self.exceeded = True
            raise _ReadError(
                f"the pair set holds more than {_fmt_bytes(self.limit)} of data in total; "
                "split it into smaller sets"
            )


def _fmt_bytes(n: int) -> str:
    return f"{n / MB:.0f} MB" if n >= MB else f"{n / 1024:.0f} KB"


def _ignored_dir(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_NAMES or _CACHE_DIR.match(name) is not None


def _is_ignored(parts: tuple[str, ...]) -> bool:
    *dirs, name = parts
    return any(_ignored_dir(d) for d in dirs) or name.startswith(".") or name.lower() in IGNORED_NAMES


def _bounded_stream_read(stream, limit: int, budget: _Budget, too_big: str) -> bytes:
    chunks, total = [], 0
    while True:
        chunk = stream.read(min(1 * MB, limit + 1 - total))
        if not chunk:
            break
        total += len(chunk)
        budget.take(len(chunk))
        if total > limit:
            raise _ReadError(too_big)
        chunks.append(chunk)
    return b"".join(chunks)


def _folder_files(root: Path, limits: PairSetLimits, budget: _Budget, problems: list[str]) -> list[_File]:
    files: list[_File] = []
    # os.walk does not follow folder links, so a link loop cannot trap us.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _ignored_dir(d))
        for fname in sorted(filenames):
            p = Path(dirpath) / fname
            rel = PurePosixPath(p.relative_to(root).as_posix())
            if _is_ignored(rel.parts):
                continue
            if not p.is_file():
                problems.append(f"{rel}: not a regular file (a broken link?)")
                continue
            if len(files) >= limits.max_archive_entries:
                problems.append(f"{root.name}: holds more than {limits.max_archive_entries} files")
                return []

            def read(p: Path = p, rel: PurePosixPath = rel) -> bytes:
                try:
                    with p.open("rb") as fh:
                        return _bounded_stream_read(
                            fh, limits.max_file_bytes, budget, _too_big(rel, limits.max_file_bytes)
                        )
                except OSError as e:
                    raise _ReadError(f"{rel}: cannot be read ({e.strerror or e})") from e

            files.append(_File(rel, str(rel), read))
    return files


def _too_big(name: object, limit: int) -> str:
    return f"{name}: file is larger than {_fmt_bytes(limit)}; export it smaller"


def _unsafe_zip_name(name: str) -> bool:
    norm = name.replace("\\", "/")
    return norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) is not None or ".." in norm.split("/")


def _zip_files(
    zf: zipfile.ZipFile, zip_name: str, limits: PairSetLimits, budget: _Budget, problems: list[str]
) -> list[_File]:
    infos = zf.infolist()
    if len(infos) > limits.max_archive_entries:
        problems.append(
            f"{zip_name}: holds {len(infos)} entries, more than the {limits.max_archive_entries} allowed"
        )
        return []
    files: list[_File] = []
    seen: set[str] = set()
    declared_total = 0
    for info in infos:
        name = info.filename
        if _unsafe_zip_name(name):
            problems.append(f"{name}: unsafe path in the zip (absolute or with '..'); refusing it")
            continue
        rel = PurePosixPath(*[p for p in name.replace("\\", "/").split("/") if p not in ("", ".")])
        if not rel.parts or info.is_dir() or _is_ignored(rel.parts):
            continue
        if stat.S_ISLNK(info.external_attr >> 16):
            problems.append(f"{name}: is a symbolic link; links are not allowed in a pair set zip")
            continue
        if info.flag_bits & 0x1:
            problems.append(f"{name}: is password-protected; zip it without a password")
            continue
        if str(rel) in seen:
            problems.append(f"{name}: appears twice in the zip")
            continue
        seen.add(str(rel))
        if info.file_size > limits.max_file_bytes:
            problems.append(_too_big(name, limits.max_file_bytes))
            continue
        declared_total += info.file_size

        def read(info: zipfile.ZipInfo = info) -> bytes:
            try:
                with zf.open(info) as fh:
                    return _bounded_stream_read(
                        fh, limits.max_file_bytes, budget, _too_big(info.filename, limits.max_file_bytes)
                    )
            except _ReadError:
                raise
            except Exception as e:  # zipfile/zlib raise many types on damaged data
                raise _ReadError(f"{info.filename}: damaged inside the zip and cannot be read") from e

        files.append(_File(rel, name, read))
    if declared_total > limits.max_total_bytes:
        problems.append(
            f"{zip_name}: unpacks to {_fmt_bytes(declared_total)}, more than the "
            f"{_fmt_bytes(limits.max_total_bytes)} allowed; split it into smaller sets"
        )
        return []
    return files


# ---------------------------------------------------------------------------------------------
# Layouts: turn the file list into (name, source file, target file, caption files).


@dataclass
class _Match:
    name: str
    source: _File
    target: _File
    captions: list[_File]  # target-side caption first


def _strip_top_folders(files: list[_File]) -> list[_File]:
    """Drop folders that wrap the whole set (a zip of `my_effect/...`), but not layout folders."""
    while files and all(len(f.path.parts) > 1 for f in files):
        tops = {f.path.parts[0] for f in files}
        if len(tops) != 1 or tops.pop().lower() in SOURCE_DIRS + TARGET_DIRS:
            break
        for f in files:
            f.path = PurePosixPath(*f.path.parts[1:])
    return files


def _kind(f: _File) -> str:
    ext = f.path.suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in CAPTION_EXTENSIONS:
        return "caption"
    return "other"


def _key(path: PurePosixPath) -> str:
    """Name without extension, case-folded, keeping sub-folders (`a/b.png` -> `a/b`)."""
    return str(path.with_suffix("")).lower()


def _index(files: list[_File], where: str, problems: list[str]) -> dict[str, _File]:
    out: dict[str, _File] = {}
    for f in files:
        k = _key(f.path)
        if k in out:
            problems.append(
                f"{out[k].display} and {f.display}: two {where} files with the same name; keep one"
            )
            continue
        out[k] = f
    return out


def _match_folders(files: list[_File], src_dir: str, tgt_dir: str, problems: list[str]) -> list[_Match]:
    side: dict[str, list[_File]] = {src_dir: [], tgt_dir: []}
    for f in files:
        top = f.path.parts[0]
        if len(f.path.parts) > 1 and top in side:
            side[top].append(_File(PurePosixPath(*f.path.parts[1:]), f.display, f.read))
        else:
            problems.append(f"{f.display}: outside the {src_dir}/ and {tgt_dir}/ folders; move or remove it")
    images, captions = {}, {}
    for d, fs in side.items():
        for f in fs:
            if _kind(f) == "other":
                problems.append(_not_image(f))
        images[d] = _index([f for f in fs if _kind(f) == "image"], f"{d}/", problems)
        captions[d] = _index([f for f in fs if _kind(f) == "caption"], f"{d}/ caption", problems)
    src, tgt = images[src_dir], images[tgt_dir]
    for k in sorted(src.keys() - tgt.keys()):
        problems.append(f"{src[k].display}: source image without a target (no {tgt_dir}/{k}.*)")
    for k in sorted(tgt.keys() - src.keys()):
        problems.append(f"{tgt[k].display}: target image without a source (no {src_dir}/{k}.*)")
    for d in (src_dir, tgt_dir):
        for k in sorted(captions[d].keys() - src.keys() - tgt.keys()):
            problems.append(f"{captions[d][k].display}: caption file with no image of the same name")
    return [
        _Match(
            name=str(src[k].path.with_suffix("")),
            source=src[k],
            target=tgt[k],
            captions=[c[k] for c in (captions[tgt_dir], captions[src_dir]) if k in c],
        )
        for k in sorted(src.keys() & tgt.keys())
    ]


def _split_suffix(path: PurePosixPath) -> tuple[str, str | None]:
    """`a/cat_01_source.png` -> ("a/cat_01", "source"); `a/cat.png` -> ("a/cat", None)."""
    m = _SUFFIX.match(path.stem)
    parent = "" if str(path.parent) == "." else f"{path.parent}/"
    if m is None:
        return parent + path.stem, None
    suffix = m["suffix"].lower()
    return parent + m["base"], ("source" if suffix in SOURCE_SUFFIXES else "target")


def _match_stems(files: list[_File], problems: list[str]) -> list[_Match]:
    sources: dict[str, list[_File]] = {}
    targets: dict[str, list[_File]] = {}
    captions: dict[str, list[tuple[str | None, _File]]] = {}
    for f in files:
        kind = _kind(f)
        if kind == "other":
            problems.append(_not_image(f))
            continue
        base, role = _split_suffix(f.path)
        if kind == "caption":
            captions.setdefault(base.lower(), []).append((role, f))
        else:
            (targets if role == "target" else sources).setdefault(base.lower(), []).append(f)
    for group in (sources, targets):
        for fs in group.values():
            if len(fs) > 1:
                names = ", ".join(f.display for f in fs)
                problems.append(
                    f"{names}: more than one {'target' if group is targets else 'source'} "
                    "image for the same pair; keep one"
                )
    for k in sorted(sources.keys() - targets.keys()):
        f = sources[k][0]
        problems.append(
            f"{f.display}: source image without a target (expected e.g. {_base_name(f)}_target{f.path.suffix})"
        )
    for k in sorted(targets.keys() - sources.keys()):
        f = targets[k][0]
        problems.append(
            f"{f.display}: target image without a source (expected e.g. {_base_name(f)}_source{f.path.suffix})"
        )
    matches = []
    for k in sorted(sources.keys() & targets.keys()):
        caps = sorted(captions.get(k, []), key=lambda rc: rc[0] != "target")
        matches.append(
            _Match(_split_suffix(targets[k][0].path)[0], sources[k][0], targets[k][0], [c for _, c in caps])
        )
    for k in sorted(captions.keys() - (sources.keys() & targets.keys())):
        for _, c in captions[k]:
            if k in sources or k in targets:
                continue  # the missing partner is already reported
            problems.append(f"{c.display}: caption file with no image of the same name")
    return matches


def _base_name(f: _File) -> str:
    return _split_suffix(PurePosixPath(f.path.name))[0]


def _not_image(f: _File) -> str:
    exts = " ".join(IMAGE_EXTENSIONS)
    return f"{f.display}: not an image or a .txt caption (accepted images: {exts})"


def _find_layout(files: list[_File], problems: list[str]) -> list[_Match]:
    tops = {f.path.parts[0].lower(): f.path.parts[0] for f in files if len(f.path.parts) > 1}
    src_dirs = [tops[d] for d in SOURCE_DIRS if d in tops]
    tgt_dirs = [tops[d] for d in TARGET_DIRS if d in tops]
    if len(src_dirs) > 1 or len(tgt_dirs) > 1:
        problems.append(
            "found several source or target folders ("
            + ", ".join(f"{d}/" for d in src_dirs + tgt_dirs)
            + "); keep one source folder and one target folder"
        )
        return []
    if src_dirs and tgt_dirs:
        return _match_folders(files, src_dirs[0], tgt_dirs[0], problems)
    if src_dirs or tgt_dirs:
        have = (src_dirs or tgt_dirs)[0]
        missing = "target/ (or targets/)" if src_dirs else "source/ (or control/)"
        problems.append(f"found a {have}/ folder but no {missing} folder next to it")
        return []
    return _match_stems(files, problems)


# ---------------------------------------------------------------------------------------------
# Images and captions.


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 / 65535.0 if arr.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def _decode_image(
    f: _File, data: bytes, limits: PairSetLimits, problems: list[str], notes: list[str]
) -> Image.Image | None:
    too_large = (
        f"{f.display}: image is too large (over {limits.max_side} px per side or "
        f"{limits.max_pixels / 1e6:.0f} megapixels), possibly a decompression bomb; export it smaller"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > limits.max_pixels or max(w, h) > limits.max_side:
                problems.append(too_large)
                return None
            if getattr(img, "n_frames", 1) > 1:
                notes.append(f"{f.display}: has several frames; using the first")
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        problems.append(too_large)
        return None
    except MemoryError:
        problems.append(too_large)
        return None
    except Exception:  # Pillow raises many types on damaged data; all mean "cannot be read"
        problems.append(f"{f.display}: cannot be read as an image (damaged file or not an image)")
        return None
    if min(img.size) < limits.min_side:
        problems.append(
            f"{f.display}: image is too small ({img.width}x{img.height}); "
            f"each side needs at least {limits.min_side} px"
        )
        return None
    return img


def _decode_caption(f: _File, data: bytes, limits: PairSetLimits, problems: list[str]) -> str | None:
    if len(data) > limits.max_caption_bytes:
        problems.append(
            f"{f.display}: caption is larger than {_fmt_bytes(limits.max_caption_bytes)}; "
            "is it really a caption?"
        )
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        problems.append(f"{f.display}: not a text caption (it is not UTF-8 text)")
        return None
    if "\x00" in text:
        problems.append(f"{f.display}: not a text caption (it holds binary data)")
        return None
    return text.strip() or None


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Entry point.


def read_pairset(path: Path, limits: PairSetLimits = PairSetLimits()) -> PairSet:
    """Read and validate a pair set from a folder or a .zip; raise PairSetError listing all problems."""
    path = Path(path)
    budget = _Budget(limits.max_total_bytes)
    problems: list[str] = []
    if path.is_dir():
        return _load(_folder_files(path, limits, budget, problems), path.name, limits, budget, problems)
    if not path.is_file():
        raise PairSetError([f"{path.name}: not found (expected a folder or a .zip file)"])
    if path.suffix.lower() != ".zip" and not zipfile.is_zipfile(path):
        raise PairSetError([f"{path.name}: not a folder or a .zip file"])
    size = path.stat().st_size
    if size > limits.max_archive_bytes:
        raise PairSetError(
            [
                f"{path.name}: the zip is {_fmt_bytes(size)}, more than the {_fmt_bytes(limits.max_archive_bytes)} "
                "allowed; split it into smaller sets"
            ]
        )
    with path.open("rb") as fh:
        try:
            zf = zipfile.ZipFile(fh)
        except Exception as e:  # BadZipFile, but damaged headers raise other types too
            raise PairSetError([f"{path.name}: not a valid zip archive (damaged or another format)"]) from e
        with zf:
            files = _zip_files(zf, path.name, limits, budget, problems)
            return _load(files, path.name, limits, budget, problems)


def _load(
    files: list[_File], set_name: str, limits: PairSetLimits, budget: _Budget, problems: list[str]
) -> PairSet:
    notes: list[str] = []
    if not files and not problems:
        raise PairSetError([f"{set_name}: is empty (no images found)"])
    matches = _find_layout(_strip_top_folders(files), problems)
    if len(matches) > limits.max_pairs:
        problems.append(
            f"{set_name}: holds {len(matches)} pairs, more than the {limits.max_pairs} allowed; split it"
        )
    pairs: list[LoadedPair] = []
    seen: dict[str, str] = {}
    total_pixels = 0

    def read(f: _File) -> bytes | None:
        try:
            return f.read()
        except _ReadError as e:
            problems.append(str(e))
            return None

    def image(f: _File) -> Image.Image | None:
        data = read(f)
        return None if data is None else _decode_image(f, data, limits, problems, notes)

    for m in matches:
        if budget.exceeded:
            break
        src, tgt = image(m.source), image(m.target)
        captions = [c for c in (read(c) for c in m.captions) if c is not None]
        texts = [_decode_caption(f, d, limits, problems) for f, d in zip(m.captions, captions)]
        if src is None or tgt is None:
            continue
        if src.size != tgt.size:
            notes.append(
                f"{m.name}: source is {src.width}x{src.height} but target is {tgt.width}x{tgt.height}"
            )
        src_hash, tgt_hash = _pixel_hash(src), _pixel_hash(tgt)
        if src_hash == tgt_hash:
            notes.append(f"{m.name}: source and target are identical; the pair teaches nothing")
        key = src_hash + tgt_hash
        if key in seen:
            problems.append(
                f"{m.source.display} + {m.target.display}: the same pair as {seen[key]} "
                "(identical source and target images); keep one"
            )
            continue
        seen[key] = f"{m.source.display} + {m.target.display}"
        present = [t for t in texts if t is not None]
        if len(set(present)) > 1:
            notes.append(
                f"{m.name}: the captions next to the source and the target differ; using the target's"
            )
        total_pixels += src.width * src.height + tgt.width * tgt.height
        if total_pixels > limits.max_total_pixels and not budget.exceeded:
            problems.append(
                f"{set_name}: the images add up to more than {limits.max_total_pixels / 1e6:.0f} megapixels; "
                "export them smaller or split the set"
            )
            budget.exceeded = True  # stop decoding: the set fails either way
        if problems:
            pairs.clear()  # the set fails; hold no decoded images, just keep validating
            continue
        pairs.append(
            LoadedPair(
                name=m.name,
                source=src,
                target=tgt,
                caption=present[0] if present else None,
                source_bytes=_png_bytes(src),
                target_bytes=_png_bytes(tgt),
                original_source_name=m.source.display,
                original_target_name=m.target.display,
            )
        )
    matched = {f.display for m in matches for f in (m.source, m.target)}
    for f in files:
        if budget.exceeded:
            break
        if _kind(f) == "image" and f.display not in matched:
            image(f)  # reported as unmatched already; also say if it is unreadable
    if not matches and not problems:
        problems.append(
            f"{set_name}: no complete source/target pairs found. Use name pairs like cat_source.png + "
            "cat_target.png, or source/ + target/ folders, or ai-toolkit's control/ + targets/ folders"
        )
    elif len(matches) < limits.min_pairs:
        problems.append(f"{set_name}: holds {len(matches)} pairs; at least {limits.min_pairs} are needed")
    if problems:
        raise PairSetError(problems)
    return PairSet(pairs=pairs, warnings=notes)


def _pixel_hash(img: Image.Image) -> str:
    h = hashlib.sha256(f"{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()
