"""Pair-set import: every layout, captions, image normalisation, and every bad input a curator may send."""

from __future__ import annotations

import io
import stat
import struct
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from studio.pairsets import LoadedPair, PairSet, PairSetError, PairSetLimits, read_pairset
from studio.thumbnails import contact_row, fit_image, make_thumbnail

# --- fixtures built in code ---------------------------------------------------------------------


def noise(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A distinct RGB image per seed (noise, so no two seeds collide)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def write_tree(root: Path, files: dict[str, bytes | str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            p.write_text(data, encoding="utf-8")
        else:
            p.write_bytes(data)
    return root


def write_zip(path: Path, files: dict[str, bytes | str], top: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel, data in files.items():
            zf.writestr(f"{top}/{rel}" if top else rel, data)
    return path


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def problems_of(path: Path, limits: PairSetLimits = PairSetLimits()) -> list[str]:
    with pytest.raises(PairSetError) as exc:
        read_pairset(path, limits)
    err = exc.value
    assert str(err).count("\n- ") == len(err.problems)  # the message lists every problem
    for p in err.problems:
        assert p in str(err)
    return err.problems


def one_matching(problems: list[str], *needles: str) -> str:
    hits = [p for p in problems if all(n in p for n in needles)]
    assert len(hits) == 1, f"expected one problem with {needles}, got {problems}"
    return hits[0]


# The same three pairs in each layout; seeds 10+i are sources, 20+i targets.
SRC = {i: noise(10 + i) for i in range(3)}
TGT = {i: noise(20 + i) for i in range(3)}


def stem_layout() -> dict[str, bytes | str]:
    return {
        "cat_00_source.png": png(SRC[0]),
        "cat_00_target.png": png(TGT[0]),
        "dog-01-Before.png": png(SRC[1]),
        "dog-01-after.png": png(TGT[1]),
        "bird_02.png": png(SRC[2]),
        "bird_02_target.png": png(TGT[2]),
        "bird_02_target.txt": "a bird, recoloured",
    }


def folder_layout(src: str = "source", tgt: str = "target") -> dict[str, bytes | str]:
    return {
        f"{src}/cat_00.png": png(SRC[0]),
        f"{tgt}/cat_00.png": png(TGT[0]),
        f"{src}/dog_01.png": png(SRC[1]),
        f"{tgt}/dog_01.png": png(TGT[1]),
        f"{src}/bird_02.png": png(SRC[2]),
        f"{tgt}/bird_02.png": png(TGT[2]),
        f"{tgt}/bird_02.txt": "a bird, recoloured",
    }


LAYOUTS = {
    "stems": (stem_layout, ["bird_02", "cat_00", "dog-01"]),
    "source-target": (folder_layout, ["bird_02", "cat_00", "dog_01"]),
    "control-targets": (lambda: folder_layout("control", "targets"), ["bird_02", "cat_00", "dog_01"]),
    "control-target": (lambda: folder_layout("control", "target"), ["bird_02", "cat_00", "dog_01"]),
}


def check_three_pairs(ps: PairSet, names: list[str]) -> None:
    assert isinstance(ps, PairSet)
    assert [p.name for p in ps.pairs] == names
    by_seed = {"cat": 0, "dog": 1, "bird": 2}
    for p in ps.pairs:
        assert isinstance(p, LoadedPair)
        i = by_seed[p.name[:3] if p.name[:3] in by_seed else p.name[:4]]
        assert p.source.mode == "RGB" and p.target.mode == "RGB"
        np.testing.assert_array_equal(arr(p.source), arr(SRC[i]))
        np.testing.assert_array_equal(arr(p.target), arr(TGT[i]))
        np.testing.assert_array_equal(arr(Image.open(io.BytesIO(p.source_bytes))), arr(SRC[i]))
        np.testing.assert_array_equal(arr(Image.open(io.BytesIO(p.target_bytes))), arr(TGT[i]))
        assert p.source_bytes.startswith(b"\x89PNG") and p.target_bytes.startswith(b"\x89PNG")
        assert p.caption == ("a bird, recoloured" if i == 2 else None)
    assert ps.warnings == []


# --- layouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_folder_layouts(tmp_path, layout):
    make, names = LAYOUTS[layout]
    ps = read_pairset(write_tree(tmp_path / "set", make()))
    check_three_pairs(ps, names)


@pytest.mark.parametrize("top", [None, "my_effect", "outer/inner"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_zip_layouts(tmp_path, layout, top):
    make, names = LAYOUTS[layout]
    ps = read_pairset(write_zip(tmp_path / "set.zip", make(), top=top))
    check_three_pairs(ps, names)


def test_original_names_are_paths_inside_the_set(tmp_path):
    ps = read_pairset(write_zip(tmp_path / "s.zip", folder_layout("control", "targets"), top="fx"))
    cat = next(p for p in ps.pairs if p.name == "cat_00")
    assert cat.original_source_name == "fx/control/cat_00.png"
    assert cat.original_target_name == "fx/targets/cat_00.png"


def test_folder_pairs_match_by_stem_across_extensions_and_case(tmp_path):
    root = write_tree(
        tmp_path / "s",
        {"source/Photo_1.JPG": jpeg(SRC[0]), "target/photo_1.png": png(TGT[0])},
    )
    ps = read_pairset(root)
    assert len(ps.pairs) == 1
    assert ps.pairs[0].original_source_name == "source/Photo_1.JPG"
    assert ps.pairs[0].source.size == SRC[0].size


def test_nested_stem_pairs_keep_their_folder_in_the_name(tmp_path):
    root = write_tree(
        tmp_path / "s",
        {
            "a/x_source.png": png(SRC[0]),
            "a/x_target.png": png(TGT[0]),
            "b/x_src.png": png(SRC[1]),
            "b/x_tgt.png": png(TGT[1]),
        },
    )
    assert [p.name for p in read_pairset(root).pairs] == ["a/x", "b/x"]


@pytest.mark.parametrize(
    "src_suffix,tgt_suffix",
    [
        ("_source", "_target"),
        ("_src", "_tgt"),
        ("_before", "_after"),
        ("_input", "_output"),
        ("_control", "_result"),
        ("-SOURCE", "-Target"),
        ("", "_target"),
    ],
)
def test_every_documented_suffix_convention(tmp_path, src_suffix, tgt_suffix):
    root = write_tree(tmp_path / "s", {f"p{src_suffix}.png": png(SRC[0]), f"p{tgt_suffix}.png": png(TGT[0])})
    (pair,) = read_pairset(root).pairs
    assert pair.name == "p"
    np.testing.assert_array_equal(arr(pair.target), arr(TGT[0]))


@pytest.mark.parametrize("container", ["folder", "zip"])
def test_hidden_and_system_files_are_ignored(tmp_path, container):
    files = folder_layout()
    files.update(
        {
            ".DS_Store": b"\x00\x01junk",
            "source/.DS_Store": b"junk",
            "__MACOSX/source/._cat_00.png": b"resource fork",
            "target/Thumbs.db": b"junk",
            "source/.hidden.png": b"not even an image",
            "_latent_cache/cat_00.safetensors": b"cache",
            ".git/objects/ab": b"git object",
        }
    )
    if container == "zip":
        path = write_zip(tmp_path / "s.zip", files, top="fx")
    else:
        path = write_tree(tmp_path / "fx", files)
    check_three_pairs(read_pairset(path), LAYOUTS["source-target"][1])


# --- captions -----------------------------------------------------------------------------------


def test_caption_next_to_source_is_used(tmp_path):
    root = write_tree(
        tmp_path / "s",
        {"source/a.png": png(SRC[0]), "target/a.png": png(TGT[0]), "source/a.txt": "  make it blue \n"},
    )
    assert read_pairset(root).pairs[0].caption == "make it blue"


def test_target_caption_wins_over_source_caption_with_a_warning(tmp_path):
    root = write_tree(
        tmp_path / "s",
        {
            "a_source.png": png(SRC[0]),
            "a_target.png": png(TGT[0]),
            "a_source.txt": "from source",
            "a_target.txt": "from target",
        },
    )
    ps = read_pairset(root)
    assert ps.pairs[0].caption == "from target"
    one_matching(ps.warnings, "a", "captions", "differ")


def test_caption_with_utf8_bom_and_unicode(tmp_path):
    root = write_tree(tmp_path / "s", {"a.png": png(SRC[0]), "a_target.png": png(TGT[0])})
    (root / "a.txt").write_bytes("\ufeffcafé au lait".encode())
    assert read_pairset(root).pairs[0].caption == "café au lait"


# --- image normalisation ------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    src = noise(1, (64, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    root = write_tree(
        tmp_path / "s", {"a.jpg": jpeg(src, exif=exif), "a_target.png": png(noise(2, (40, 64)))}
    )
    ps = read_pairset(root)
    assert ps.pairs[0].source.size == (40, 64)
    assert ps.warnings == []


def test_alpha_is_composited_on_white_and_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent -> white
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black -> mid grey
    la = Image.new("LA", (40, 40), (0, 0))
    pal = Image.new("P", (40, 40), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = 1
    i16 = Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16))
    gray = Image.new("L", (40, 40), 77)
    root = write_tree(
        tmp_path / "s",
        {
            "rgba.png": png(rgba),
            "rgba_target.png": png(gray),
            "la.png": png(la),
            "la_target.png": png(gray),
            "p.png": png(pal),
            "p_target.png": png(noise(3, (40, 40))),
            "i16.png": png(i16),
            "i16_target.png": png(noise(4, (40, 40))),
        },
    )
    pairs = {p.name: p for p in read_pairset(root).pairs}
    a = arr(pairs["rgba"].source)
    assert tuple(a[0, 0]) == (255, 255, 255)
    assert all(120 <= v <= 135 for v in a[0, 1])
    assert tuple(a[5, 5]) == (255, 0, 0)
    assert tuple(arr(pairs["rgba"].target)[3, 3]) == (77, 77, 77)
    assert tuple(arr(pairs["la"].source)[3, 3]) == (255, 255, 255)
    assert tuple(arr(pairs["p"].source)[3, 3]) == (255, 255, 255)
    assert tuple(arr(pairs["i16"].source)[3, 3]) == (255, 255, 255)
    assert all(p.source.mode == "RGB" and p.target.mode == "RGB" for p in pairs.values())


def test_png_bytes_are_canonical_across_containers(tmp_path):
    files = stem_layout()
    from_folder = read_pairset(write_tree(tmp_path / "s", files)).pairs
    from_zip = read_pairset(write_zip(tmp_path / "s.zip", files, top="x")).pairs
    assert [p.source_bytes for p in from_folder] == [p.source_bytes for p in from_zip]
    assert [p.target_bytes for p in from_folder] == [p.target_bytes for p in from_zip]


def test_source_and_target_sizes_may_differ_with_a_warning(tmp_path):
    root = write_tree(
        tmp_path / "s", {"a.png": png(noise(1, (48, 48))), "a_target.png": png(noise(2, (64, 32)))}
    )
    ps = read_pairset(root)
    assert ps.pairs[0].target.size == (64, 32)
    one_matching(ps.warnings, "a", "48x48", "64x32")


def test_identical_source_and_target_warns(tmp_path):
    root = write_tree(tmp_path / "s", {"a.png": png(SRC[0]), "a_target.png": png(SRC[0])})
    one_matching(read_pairset(root).warnings, "a", "identical")


def test_zip_is_read_without_writing_anything(tmp_path, monkeypatch):
    z = write_zip(tmp_path / "s.zip", stem_layout())

    def refuse(*a, **k):
        raise AssertionError("read_pairset must not extract")

    monkeypatch.setattr(zipfile.ZipFile, "extract", refuse)
    monkeypatch.setattr(zipfile.ZipFile, "extractall", refuse)
    before = sorted(tmp_path.rglob("*"))
    assert len(read_pairset(z).pairs) == 3
    assert sorted(tmp_path.rglob("*")) == before


# --- bad input: every problem named, all collected ----------------------------------------------


def test_unpaired_images_are_named(tmp_path):
    root = write_tree(
        tmp_path / "s",
        {
            "a_source.png": png(SRC[0]),
            "a_target.png": png(TGT[0]),
            "lonely_source.png": png(SRC[1]),
            "orphan_target.jpg": jpeg(TGT[1]),
        },
    )
    probs = problems_of(root)
    one_matching(probs, "lonely_source.png", "without a target", "lonely_target.png")
    one_matching(probs, "orphan_target.jpg", "without a source")
    assert len(probs) == 2


def test_unpaired_images_in_folders_are_named(tmp_path):
    files = folder_layout("control", "targets")
    files["control/extra.png"] = png(SRC[1])
    files["targets/spare.png"] = png(TGT[1])
    probs = problems_of(write_zip(tmp_path / "s.zip", files))
    one_matching(probs, "control/extra.png", "without a target")
    one_matching(probs, "targets/spare.png", "without a source")


def test_only_one_side_folder(tmp_path):
    root = write_tree(tmp_path / "s", {"control/a.png": png(SRC[0]), "control/b.png": png(SRC[1])})
    one_matching(problems_of(root), "control/", "no target")


def test_files_outside_the_side_folders(tmp_path):
    files = folder_layout()
    files["stray.png"] = png(SRC[1])
    files["other/thing.png"] = png(SRC[2])
    probs = problems_of(write_tree(tmp_path / "s", files))
    one_matching(probs, "stray.png", "outside")
    one_matching(probs, "other/thing.png", "outside")


def test_several_source_folders_is_ambiguous(tmp_path):
    files = folder_layout("source", "target")
    files["control/cat_00.png"] = png(SRC[0])
    one_matching(problems_of(write_tree(tmp_path / "s", files)), "source/", "control/", "several")


def test_non_image_files_and_bad_captions(tmp_path):
    files = stem_layout()
    files["notes.md"] = "my notes"
    files["cat_00_source.txt"] = b"\x89PNG\r\n\x1a\n\x00\x00binary"
    files["zebra.txt"] = "a caption for nothing"
    files["bird_02_target.txt"] = b"\xff\xfe\xfa not utf8"
    probs = problems_of(write_tree(tmp_path / "s", files))
    one_matching(probs, "notes.md", "not an image")
    one_matching(probs, "cat_00_source.txt", "not a text caption")
    one_matching(probs, "zebra.txt", "no image")
    one_matching(probs, "bird_02_target.txt", "not a text caption")
    assert len(probs) == 4


def test_corrupt_png_and_jpeg(tmp_path):
    good_png, good_jpg = png(SRC[0]), jpeg(SRC[1])
    root = write_tree(
        tmp_path / "s",
        {
            "a.png": good_png[: len(good_png) // 2],
            "a_target.png": png(TGT[0]),
            "b.jpg": good_jpg[:200],
            "b_target.png": png(TGT[1]),
            "c.png": b"this is text, not a png",
            "c_target.png": png(TGT[2]),
        },
    )
    probs = problems_of(root)
    for name in ("a.png", "b.jpg", "c.png"):
        one_matching(probs, name, "cannot be read as an image")
    assert len(probs) == 3


def test_duplicate_pairs_by_content_and_by_stem(tmp_path):
    files = folder_layout()
    files["source/cat_copy.png"] = png(SRC[0])
    files["target/cat_copy.png"] = png(TGT[0])
    files["source/dog_01.jpg"] = jpeg(SRC[1])
    probs = problems_of(write_tree(tmp_path / "s", files))
    one_matching(probs, "cat_copy.png", "cat_00.png", "same pair")
    one_matching(probs, "source/dog_01.jpg", "source/dog_01.png", "same name")


def test_two_source_files_for_one_stem(tmp_path):
    root = write_tree(
        tmp_path / "s",
        {"a.png": png(SRC[0]), "a_source.png": png(SRC[1]), "a_target.png": png(TGT[0])},
    )
    one_matching(problems_of(root), "a.png", "a_source.png", "more than one source")


def test_too_small_images(tmp_path):
    root = write_tree(
        tmp_path / "s", {"a.png": png(noise(1, (16, 64))), "a_target.png": png(noise(2, (64, 64)))}
    )
    one_matching(problems_of(root), "a.png", "too small", "16x64", "32 px")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares huge dimensions but holds (almost) no data: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    root = write_tree(
        tmp_path / "s",
        {
            "ours.png": _png_header_only(7000, 7000),  # 49 MP: over our 36 MP, under Pillow's own limit
            "ours_target.png": png(TGT[0]),
            "pillow.png": _png_header_only(100_000, 100_000),  # Pillow raises DecompressionBombError
            "pillow_target.png": png(TGT[1]),
            "wide.png": _png_header_only(20_000, 40),  # few pixels but a silly side
            "wide_target.png": png(TGT[2]),
        },
    )
    probs = problems_of(root)
    for name in ("ours.png", "pillow.png", "wide.png"):
        one_matching(probs, name, "too large", "decompression bomb")


def test_pixel_limit_is_configurable(tmp_path):
    root = write_tree(tmp_path / "s", {"a.png": png(noise(1, (100, 100))), "a_target.png": png(TGT[0])})
    one_matching(problems_of(root, PairSetLimits(max_pixels=64 * 64)), "a.png", "too large")


def test_oversized_file_in_folder_and_zip(tmp_path):
    files = stem_layout()
    limits = PairSetLimits(max_file_bytes=4000)  # the noise PNGs are ~5.8 KB
    probs = problems_of(write_tree(tmp_path / "s", files), limits)
    one_matching(probs, "cat_00_source.png", "larger than")
    probs = problems_of(write_zip(tmp_path / "s.zip", files), limits)
    one_matching(probs, "cat_00_source.png", "larger than")


def test_oversized_archive(tmp_path):
    z = write_zip(tmp_path / "s.zip", stem_layout())
    one_matching(problems_of(z, PairSetLimits(max_archive_bytes=1000)), "s.zip", "split")


def test_too_many_archive_entries_and_files(tmp_path):
    files = {
        f"p{i}_{s}.png": png(noise(i * 2 + (s == "target"), (32, 32)))
        for i in range(4)
        for s in ("source", "target")
    }
    limits = PairSetLimits(max_archive_entries=5)
    one_matching(problems_of(write_zip(tmp_path / "s.zip", files), limits), "s.zip", "8 entries")
    one_matching(problems_of(write_tree(tmp_path / "s", files), limits), "more than 5 files")


def test_zip_bomb_by_declared_size(tmp_path):
    # Each entry is small compressed but large unpacked; the total is over the limit.
    blob = b"\x00" * 300_000
    files = {f"pad{i}.png": blob for i in range(5)}
    z = write_zip(tmp_path / "bomb.zip", files)
    assert z.stat().st_size < 10_000
    limits = PairSetLimits(max_total_bytes=1_000_000, max_file_bytes=400_000)
    one_matching(problems_of(z, limits), "bomb.zip", "unpacks to")


def test_total_bytes_actually_read_are_bounded(tmp_path):
    files = {
        f"p{i}_{s}.png": png(noise(i * 2 + (s == "target"), (64, 64)))
        for i in range(6)
        for s in ("source", "target")
    }
    root = write_tree(tmp_path / "s", files)
    one_matching(problems_of(root, PairSetLimits(max_total_bytes=40_000)), "more than", "in total")


def test_zip_bomb_with_lying_header_is_caught(tmp_path):
    # Declare a tiny uncompressed size in the headers while the data inflates to much more.
    z = write_zip(tmp_path / "liar.zip", {"a_source.png": png(SRC[0]), "a_target.png": png(TGT[0])})
    data = bytearray(z.read_bytes())
    real = len(png(SRC[0]))
    lie = struct.pack("<I", 100)
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        i = data.find(sig)
        assert struct.unpack("<I", data[i + offset : i + offset + 4])[0] == real
        data[i + offset : i + offset + 4] = lie
    z.write_bytes(bytes(data))
    one_matching(problems_of(z), "a_source.png", "damaged")


def _zip_with_infos(path: Path, entries: list[tuple[zipfile.ZipInfo, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return path


def test_zip_slip_and_symlinks(tmp_path):
    link = zipfile.ZipInfo("b_target.png")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    z = _zip_with_infos(
        tmp_path / "evil.zip",
        [
            (zipfile.ZipInfo("a_source.png"), png(SRC[0])),
            (zipfile.ZipInfo("a_target.png"), png(TGT[0])),
            (zipfile.ZipInfo("../escape_target.png"), png(TGT[1])),
            (zipfile.ZipInfo("/etc/abs_source.png"), png(SRC[1])),
            (zipfile.ZipInfo("x/../../up.png"), png(SRC[2])),
            (zipfile.ZipInfo("C:/win.png"), png(SRC[2])),
            (zipfile.ZipInfo("b_source.png"), png(SRC[2])),
            (link, b"/etc/passwd"),
        ],
    )
    assert "../escape_target.png" in zipfile.ZipFile(z).namelist()
    probs = problems_of(z)
    for name in ("../escape_target.png", "/etc/abs_source.png", "x/../../up.png", "C:/win.png"):
        one_matching(probs, name, "unsafe path")
    one_matching(probs, "b_target.png", "symbolic link")


def test_password_protected_and_duplicate_zip_entries(tmp_path):
    with pytest.warns(UserWarning, match="Duplicate name"):
        z = _zip_with_infos(
            tmp_path / "s.zip",
            [
                (zipfile.ZipInfo("a_source.png"), png(SRC[0])),
                (zipfile.ZipInfo("a_target.png"), png(TGT[0])),
                (zipfile.ZipInfo("b_source.png"), png(SRC[1])),
                (zipfile.ZipInfo("b_source.png"), png(SRC[2])),
                (zipfile.ZipInfo("b_target.png"), png(TGT[1])),
            ],
        )
    # zipfile cannot write encrypted entries; set the "encrypted" flag in the central directory.
    data = bytearray(z.read_bytes())
    entry = data.find(b"PK\x01\x02")  # first central-directory record
    entry = data.find(b"PK\x01\x02", entry + 1)  # the second one is a_target.png
    assert data[entry + 46 : entry + 46 + 12] == b"a_target.png"
    data[entry + 8] |= 0x1
    z.write_bytes(bytes(data))
    probs = problems_of(z)
    one_matching(probs, "a_target.png", "password")
    one_matching(probs, "b_source.png", "twice")


def test_too_many_pairs(tmp_path):
    root = write_tree(tmp_path / "s", stem_layout())
    one_matching(problems_of(root, PairSetLimits(max_pairs=2)), "3 pairs", "more than the 2")
    one_matching(problems_of(root, PairSetLimits(min_pairs=5)), "3 pairs", "at least 5")


@pytest.mark.parametrize("kind", ["empty folder", "empty zip", "only junk"])
def test_empty_sets(tmp_path, kind):
    if kind == "empty folder":
        path = write_tree(tmp_path / "s", {})
    elif kind == "empty zip":
        path = write_zip(tmp_path / "s.zip", {})
    else:
        path = write_zip(tmp_path / "s.zip", {".DS_Store": b"x", "__MACOSX/._a.png": b"y"})
    one_matching(problems_of(path), "empty")


def test_images_without_any_naming_convention(tmp_path):
    root = write_tree(tmp_path / "s", {"one.png": png(SRC[0]), "two.png": png(SRC[1])})
    probs = problems_of(root)
    one_matching(probs, "one.png", "without a target")
    one_matching(probs, "two.png", "without a target")


def test_not_a_zip_and_missing_path(tmp_path):
    fake = tmp_path / "set.zip"
    fake.write_text("hello, I am not a zip")
    one_matching(problems_of(fake), "set.zip", "not a valid zip")
    single = tmp_path / "a.png"
    single.write_bytes(png(SRC[0]))
    one_matching(problems_of(single), "a.png", "not a folder or a .zip")
    one_matching(problems_of(tmp_path / "nope"), "nope", "not found")


def test_all_problems_are_collected_into_one_error(tmp_path):
    files = folder_layout("control", "targets")
    files["control/tiny.png"] = png(noise(5, (8, 8)))
    files["targets/tiny.png"] = png(noise(6, (8, 8)))
    files["control/broken.png"] = b"nope"
    files["targets/broken.png"] = png(TGT[1])
    files["control/lonely.png"] = png(SRC[2])
    files["targets/readme.pdf"] = b"%PDF-1.4"
    probs = problems_of(write_zip(tmp_path / "s.zip", files, top="fx"))
    one_matching(probs, "control/tiny.png", "too small")
    one_matching(probs, "targets/tiny.png", "too small")
    one_matching(probs, "control/broken.png", "cannot be read")
    one_matching(probs, "control/lonely.png", "without a target")
    one_matching(probs, "targets/readme.pdf", "not an image")
    assert len(probs) == 5


def test_unmatched_images_are_still_checked(tmp_path):
    root = write_tree(tmp_path / "s", {"a.png": png(SRC[0]), "a_target.png": png(TGT[0]), "b.png": b"junk"})
    probs = problems_of(root)
    one_matching(probs, "b.png", "without a target")
    one_matching(probs, "b.png", "cannot be read")


# --- robustness: arbitrary bytes never crash with anything but PairSetError ---------------------

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID_ZIP = (lambda p: p.read_bytes())(write_zip(Path(tempfile.mkdtemp()) / "v.zip", stem_layout()))


def _read_bytes_as(name: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / name
        p.write_bytes(data)
        try:
            read_pairset(p)
        except PairSetError:
            pass


@FAST
@given(st.binary(max_size=2048))
def test_random_bytes_as_zip(data):
    _read_bytes_as("x.zip", data)


@FAST
@given(st.binary(max_size=2048), st.sampled_from(["png", "jpg", "webp", "bmp", "tiff"]))
def test_random_bytes_as_images(data, ext):
    with tempfile.TemporaryDirectory() as d:
        root = write_tree(Path(d) / "s", {f"a.{ext}": data, f"a_target.{ext}": data[::-1]})
        with pytest.raises(PairSetError):
            read_pairset(root)


@FAST
@given(st.lists(st.tuples(st.integers(0, len(VALID_ZIP) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_damaged_valid_zip(flips):
    data = bytearray(VALID_ZIP)
    for pos, value in flips:
        data[pos] = value
    _read_bytes_as("x.zip", bytes(data))


NAME_PARTS = st.sampled_from(
    [
        "a",
        "b",
        "source",
        "target",
        "control",
        "targets",
        "..",
        ".",
        "",
        "__MACOSX",
        ".hid",
        "C:",
        "\\",
        "x_source",
        "x_target",
        "x",
    ]
)


@FAST
@given(
    st.lists(
        st.tuples(
            st.lists(NAME_PARTS, min_size=1, max_size=3).map("/".join),
            st.sampled_from([".png", ".txt", ".jpg", ""]),
            st.one_of(
                st.binary(max_size=64), st.sampled_from([png(SRC[0]), png(TGT[0]), png(noise(7, (8, 8)))])
            ),
        ),
        max_size=6,
    )
)
def test_random_zip_entries(entries):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are part of the test
        for name, ext, data in entries:
            zf.writestr(zipfile.ZipInfo((name or "n") + ext), data)
    _read_bytes_as("x.zip", buf.getvalue())


# --- thumbnails ---------------------------------------------------------------------------------


def test_tiny_images_upscale_crisply_by_whole_factors():
    small = noise(1, (32, 16))
    thumb = Image.open(io.BytesIO(make_thumbnail(small, 128)))
    assert thumb.size == (128, 64)
    expected = np.repeat(np.repeat(arr(small), 4, axis=0), 4, axis=1)
    np.testing.assert_array_equal(arr(thumb), expected)
    assert fit_image(noise(2, (48, 20)), 128).size == (96, 40)  # 2x, not a blurry 2.67x
    assert fit_image(noise(3, (100, 50)), 128).size == (100, 50)


def test_large_images_downscale_keeping_aspect():
    thumb = Image.open(io.BytesIO(make_thumbnail(noise(1, (400, 100)), 128)))
    assert thumb.size == (128, 32)
    flat = Image.new("RGB", (300, 300), (10, 200, 30))
    assert tuple(arr(fit_image(flat, 64))[10, 10]) == (10, 200, 30)


def test_contact_row_places_images_side_by_side():
    src, tgt = noise(1, (32, 32)), noise(2, (64, 32))
    row = Image.open(io.BytesIO(contact_row([src, tgt], size=64, gap=4)))
    assert row.size == (64 * 2 + 4, 64)
    a = arr(row)
    np.testing.assert_array_equal(a[:, :64], np.repeat(np.repeat(arr(src), 2, 0), 2, 1))
    np.testing.assert_array_equal(a[16:48, 68:132], arr(tgt))  # 64x32 centred vertically, factor 1
    assert (a[:, 64:68] == 255).all()
    with pytest.raises(ValueError):
        contact_row([])
