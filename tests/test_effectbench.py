"""EffectBench-mini: the effect library, the bench writer and the contact sheet."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from distill.effectbench import bench
from distill.effectbench.bench import BenchSpec, ground_truth, load_manifest, write_bench
from distill.effectbench.contact_sheet import GAP, contact_sheet, label_height, write_contact_sheet
from distill.effectbench.effects import (
    EFFECT_NAMES,
    EFFECTS,
    EXTENSION,
    KINDS,
    MAIN_BENCH,
    compose,
    get_effect,
    split_of,
)
from distill.effectbench.general import GENERAL_EDITS
from distill.effectbench.scenes import CATEGORIES, from_pil, make_scene

N_SCENES = 20


def _scenes(size: int = 64):
    return [make_scene(CATEGORIES[i % 2], 70_000 + i, size) for i in range(N_SCENES)]


@pytest.fixture(scope="module")
def scenes():
    return _scenes()


@pytest.fixture(scope="module")
def outputs(scenes):
    """Every effect and every general edit on the same 20 scenes: name -> (20, H, W, 3)."""
    out = {e.name: np.stack([e.fn(s.image, s.mask) for s in scenes]) for e in EFFECTS}
    for g in GENERAL_EDITS:
        out[f"general:{g.name}"] = np.stack([g.fn(s.image).astype(np.float32) for s in scenes])
    return out


def _area_down(x: np.ndarray) -> np.ndarray:
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean((2, 4))


def _psnr_matrix(outs: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """Per-scene PSNR (dB) between every two outputs: (names, array [E, E, scenes])."""
    names = list(outs)
    x = np.stack([outs[n].reshape(N_SCENES, -1) for n in names], axis=1).astype(np.float64)  # S, E, D
    sq = (x * x).sum(-1)  # S, E
    gram = x @ x.transpose(0, 2, 1)  # pairwise dot products, one matmul per scene
    mse = np.maximum(sq[:, :, None] + sq[:, None, :] - 2 * gram, 0) / x.shape[-1]
    return names, np.moveaxis(10 * np.log10(1.0 / np.maximum(mse, 1e-12)), 0, -1)


# ----------------------------------------------------------------------------------------------
# The library


def test_library_size_order_and_metadata():
    assert len(EFFECTS) >= 56
    assert len(MAIN_BENCH) == 50 and MAIN_BENCH == EFFECTS[:50]
    assert EXTENSION == EFFECTS[50:] and len(EXTENSION) >= 6
    assert len(set(EFFECT_NAMES)) == len(EFFECTS)
    for e in EFFECTS:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", e.name), e.name
        assert e.kind in KINDS
        assert e.display_name and e.display_name[0].isupper()
        assert len(e.teacher_prompt.split()) >= 4 and e.teacher_prompt.endswith("."), e.teacher_prompt
        assert get_effect(e.name) is e
    assert len({e.teacher_prompt for e in EFFECTS}) == len(EFFECTS)
    # every kind is in the main bench and in the extension
    assert {e.kind for e in MAIN_BENCH} == set(KINDS)
    assert len({e.kind for e in EXTENSION}) >= 4
    assert split_of("sepia") == "main" and split_of(EXTENSION[0]) == "extension"
    with pytest.raises(KeyError, match="no bench effect called 'sepiaa'"):
        get_effect("sepiaa")


@pytest.mark.parametrize("size", [64, 32])
def test_every_effect_returns_an_image_and_leaves_its_input_alone(size):
    for s in _scenes(size)[:2]:
        img, mask = s.image.copy(), s.mask.copy()
        for e in EFFECTS:
            out = e.fn(s.image, s.mask)
            assert out.shape == (size, size, 3) and out.dtype == np.float32, e.name
            assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0, e.name
            m = e.mask_after(s.mask)
            assert m.shape == (size, size) and m.dtype == np.float32 and 0 <= m.min() <= m.max() <= 1, e.name
            np.testing.assert_array_equal(s.image, img, err_msg=e.name)
            np.testing.assert_array_equal(s.mask, mask, err_msg=e.name)


def test_effects_are_deterministic(outputs):
    again = _scenes()  # regenerated from the same seeds
    for e in EFFECTS:
        for i in (0, 7):
            np.testing.assert_array_equal(
                e.fn(again[i].image, again[i].mask), outputs[e.name][i], err_msg=e.name
            )


@pytest.mark.parametrize("resolution", ["64px", "32px"])
def test_effects_differ_from_each_other_the_identity_and_the_general_edits(outputs, resolution):
    outs = outputs if resolution == "64px" else {k: _area_down(v) for k, v in outputs.items()}
    names, psnr = _psnr_matrix(outs)
    mean = psnr.mean(-1)
    p90 = np.percentile(psnr, 90, axis=-1)
    too_close = []
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            b = names[j]
            if a.startswith("general:") and b.startswith("general:"):
                continue  # the general edits are not ours to separate
            if b == "general:identity":
                limit = 25.0  # every effect changes the image clearly
            else:
                limit = 27.0
            if mean[i, j] >= limit or p90[i, j] >= limit + 2:
                too_close.append(f"{a} ~ {b}: mean {mean[i, j]:.1f} dB, p90 {p90[i, j]:.1f} dB")
    assert not too_close, "\n".join(too_close)


def test_geometric_effects_move_the_mask_with_the_pixels(scenes):
    s = scenes[3]
    as_image = np.repeat(s.mask[..., None], 3, axis=2)
    for e in EFFECTS:
        if e.kind != "geometric":
            continue
        warped = e.fn(as_image, s.mask)[..., 0]
        np.testing.assert_allclose(e.mask_after(s.mask), warped, atol=1e-5, err_msg=e.name)
    # layout effects too: the 2x2 tiling and the pop-art grid put four small subjects down
    m = get_effect("pop_art_2x2").mask_after(s.mask)
    np.testing.assert_allclose(m, get_effect("tile_2x2").mask_after(s.mask))
    q = [m[:32, :32], m[:32, 32:], m[32:, :32], m[32:, 32:]]
    assert all(abs(qq.sum() - s.mask.sum() / 4) < 0.05 * s.mask.sum() for qq in q)


def test_frames_and_crops_cut_the_mask_and_colour_effects_keep_it(scenes):
    ones = np.ones((64, 64), np.float32)
    for name in ("frame_red", "frame_gold", "frame_double", "letterbox", "circle_crop", "frame_polaroid"):
        m = get_effect(name).mask_after(ones)
        assert m[0, 0] == 0 and m[32, 32] == 1, name
    s = scenes[0]
    for name in ("sepia", "glitch", "silhouette", "bg_sky"):
        np.testing.assert_array_equal(get_effect(name).mask_after(s.mask), s.mask)
    small = get_effect("shrink_center").mask_after(s.mask)
    assert 0.2 < small.sum() / s.mask.sum() < 0.4  # 0.55^2 of the area
    ys, xs = np.nonzero(small > 0.5)
    assert abs((ys.min() + ys.max() + 1) / 2 - 32) <= 1.5 and abs((xs.min() + xs.max() + 1) / 2 - 32) <= 1.5


def test_compose_is_b_after_a_with_the_moved_mask(scenes):
    s = scenes[1]
    both = compose("tile_2x2", "silhouette")
    tiled = get_effect("tile_2x2")
    expect = get_effect("silhouette").fn(tiled.fn(s.image, s.mask), tiled.mask_after(s.mask))
    np.testing.assert_array_equal(both.fn(s.image, s.mask), expect)
    assert both.kind == "composite" and "then" in both.display_name
    assert both.teacher_prompt.startswith(
        "Please apply Tiled 2x2 to the input image, and then apply Silhouette"
    )
    # all four small subjects are black, not just where the big one was
    out, m = both.fn(s.image, s.mask), tiled.mask_after(s.mask)
    for sl in ((slice(0, 32), slice(0, 32)), (slice(32, 64), slice(32, 64))):
        sub = m[sl] > 0.99
        assert sub.sum() > 10 and out[sl][sub].max() < 0.08
    np.testing.assert_allclose(both.mask_after(s.mask), m)
    # order matters
    assert not np.allclose(
        compose("sepia", "negative").fn(s.image, s.mask), compose("negative", "sepia").fn(s.image, s.mask)
    )


def test_effects_do_what_their_names_say(scenes):
    """A few cheap semantic checks that the procedures match their prompts."""
    s = scenes[2]
    bg = s.mask < 0.01
    subj = s.mask > 0.99
    white = get_effect("bg_white").fn(s.image, s.mask)
    assert np.allclose(white[bg], 0.97, atol=1e-6) and np.allclose(white[subj], s.image[subj], atol=1e-6)
    splash = get_effect("colour_splash").fn(s.image, s.mask)
    assert np.ptp(splash[bg], axis=-1).max() < 1e-5  # grey background
    mirror = get_effect("mirror_left").fn(s.image, s.mask)
    np.testing.assert_array_equal(mirror, mirror[:, ::-1])
    tiles = get_effect("tile_2x2").fn(s.image, s.mask)
    np.testing.assert_allclose(tiles[:32, :32], tiles[32:, 32:], atol=1e-6)
    neg = get_effect("negative").fn(s.image, s.mask)
    np.testing.assert_allclose(neg, 1 - s.image, atol=1e-6)
    red = get_effect("frame_red").fn(s.image, s.mask)
    assert red[1, 1, 0] > 0.7 and red[1, 1, 1] < 0.1


# ----------------------------------------------------------------------------------------------
# The bench


def test_seeds_of_train_and_test_never_overlap():
    spec = BenchSpec()
    assert spec.n_train_pairs == 20 and spec.n_test_per_category == 100 and spec.effects == EFFECT_NAMES
    train = {bench.train_seed(e, i, seed) for e in EFFECT_NAMES for i in range(20) for seed in (0, 1, 999)}
    test = {bench.test_seed(c, i, seed) for c in CATEGORIES for i in range(100) for seed in (0, 1, 999)}
    assert len(train) == len(EFFECT_NAMES) * 20 * 3 and len(test) == 2 * 100 * 3
    assert max(train) < bench.TEST_SEED_BASE <= min(test) and max(test) < 2**31
    with pytest.raises(ValueError, match="seed"):
        BenchSpec(seed=1000)
    with pytest.raises(KeyError, match="no bench effect"):
        BenchSpec(effects=("nope",))


def test_test_sources_are_deterministic_and_mixed():
    a = bench.test_sources("portrait", 3, seed=0)
    b = bench.test_sources("portrait", 3, seed=0)
    assert all(x.category == "portrait" for x in a)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.image, y.image)
    assert not np.array_equal(a[0].image, bench.test_sources("portrait", 1, seed=1)[0].image)
    assert [bench.train_scene("sepia", i).category for i in range(4)] == ["animal", "portrait"] * 2


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return from_pil(im)


def test_write_bench_layout_manifest_and_resume(tmp_path):
    names = ("sepia", "tile_2x2", "bg_sky", EXTENSION[0].name)
    spec = BenchSpec(n_train_pairs=20, n_test_per_category=6, effects=names)
    calls = []
    manifest = write_bench(tmp_path, spec, progress=lambda i, n: calls.append((i, n)))
    assert calls[-1] == (len(names) + 2, len(names) + 2) and len(calls) == len(names) + 2

    assert manifest == json.loads((tmp_path / "manifest.json").read_text()) == load_manifest(tmp_path)
    assert manifest["complete"] is True and BenchSpec.from_dict(manifest["spec"]) == spec
    assert [e["name"] for e in manifest["effects"]] == list(names)
    for entry in manifest["effects"]:
        e = get_effect(entry["name"])
        assert (entry["display_name"], entry["teacher_prompt"], entry["kind"]) == (
            e.display_name,
            e.teacher_prompt,
            e.kind,
        )
        assert entry["split"] == ("extension" if e in EXTENSION else "main")
        folder = tmp_path / entry["dir"]
        assert sorted(p.name for p in folder.iterdir()) == ["source", "target"]  # a pure pair set
        assert (
            len(list((folder / "source").glob("*.png"))) == 20 == len(list((folder / "target").glob("*.png")))
        )
        assert entry["sources"][0] == f"{e.name}/source/0001.png" and len(entry["targets"]) == 20
        assert (tmp_path / entry["teacher_prompt_file"]).read_text().strip() == e.teacher_prompt
        # the pairs are the scenes and their exact ground truth (up to 8-bit rounding)
        scene = bench.train_scene(e, 5, spec)
        np.testing.assert_allclose(_png(tmp_path / entry["sources"][5]), scene.image, atol=0.5 / 255 + 1e-6)
        np.testing.assert_allclose(
            _png(tmp_path / entry["targets"][5]), ground_truth(e, scene), atol=0.5 / 255 + 1e-6
        )
    for c in CATEGORIES:
        t = manifest["test"][c]
        assert len(t["images"]) == 6 == len(list((tmp_path / "test" / c).glob("*.png")))
        assert len(list((tmp_path / "test" / c / "masks").glob("*.png"))) == 6
        loaded = bench.load_test_scenes(tmp_path, c)
        fresh = bench.test_sources(c, 6, spec.seed, spec.size)
        for x, y in zip(loaded, fresh):
            np.testing.assert_allclose(x.image, y.image, atol=0.5 / 255 + 1e-6)
            np.testing.assert_allclose(x.mask, y.mask, atol=0.5 / 255 + 1e-6)
    train_seeds = {s for e in manifest["effects"] for s in e["seeds"]}
    assert not train_seeds & {s for t in manifest["test"].values() for s in t["seeds"]}

    # resume: complete folders are kept as they are; a missing one and a crashed tmp are redone
    kept = (tmp_path / "sepia" / "target" / "0003.png").stat().st_mtime_ns
    shutil.rmtree(tmp_path / "bg_sky")
    (tmp_path / ".tmp-bg_sky-123" / "source").mkdir(parents=True)
    again = write_bench(tmp_path, spec)
    assert again == manifest
    assert (tmp_path / "sepia" / "target" / "0003.png").stat().st_mtime_ns == kept
    assert len(list((tmp_path / "bg_sky" / "target").glob("*.png"))) == 20
    assert not list(tmp_path.glob(".tmp-*"))

    # an effect whose procedure changed since (other fingerprint) is rewritten, the others kept
    stale = json.loads((tmp_path / "manifest.json").read_text())
    stale["effects"][1]["fingerprint"] = "0" * 16
    (tmp_path / "manifest.json").write_text(json.dumps(stale))
    redo = (tmp_path / names[1] / "target" / "0003.png").stat().st_mtime_ns
    assert write_bench(tmp_path, spec) == manifest
    assert (tmp_path / names[1] / "target" / "0003.png").stat().st_mtime_ns != redo
    assert (tmp_path / "sepia" / "target" / "0003.png").stat().st_mtime_ns == kept

    with pytest.raises(ValueError, match="other settings"):
        write_bench(tmp_path, BenchSpec(n_train_pairs=3, n_test_per_category=6, effects=names))


def test_written_pair_set_imports_with_the_studio_reader(tmp_path):
    pairsets = pytest.importorskip("studio.pairsets")
    write_bench(tmp_path, BenchSpec(n_train_pairs=3, n_test_per_category=1, effects=("halftone",)))
    ps = pairsets.read_pairset(tmp_path / "halftone")
    assert len(ps.pairs) == 3


def test_load_manifest_explains_a_missing_bench(tmp_path):
    with pytest.raises(FileNotFoundError, match="write the bench first"):
        load_manifest(tmp_path)


# ----------------------------------------------------------------------------------------------
# The contact sheet


def test_contact_sheet_size_and_cells(tmp_path, scenes):
    s = scenes[4]
    chosen = [EFFECTS[0], "tile_2x2", EFFECTS[-1]]
    sheet = contact_sheet(chosen, s, cell=64, cols=3)
    rows = 2  # source + 3 effects in 3 columns
    assert sheet.size == (3 * 64 + 4 * GAP, rows * (64 + label_height(64)) + 3 * GAP)
    arr = np.asarray(sheet)
    # row 0: source, effect 0, tile_2x2; row 1: the last effect
    np.testing.assert_array_equal(arr[GAP : GAP + 64, GAP : GAP + 64], np.asarray(s.to_pil()))
    x1 = GAP + (64 + GAP)
    expect = (np.clip(EFFECTS[0].fn(s.image, s.mask), 0, 1) * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(arr[GAP : GAP + 64, x1 : x1 + 64], expect)
    y1 = GAP + 64 + label_height(64) + GAP
    expect = (EFFECTS[-1].fn(s.image, s.mask) * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(arr[y1 : y1 + 64, GAP : GAP + 64], expect)
    label = arr[GAP + 64 : GAP + 64 + label_height(64), GAP : GAP + 64]
    assert (label.min(-1) < 100).sum() > 20  # dark text on the white label strip

    path = write_contact_sheet(tmp_path / "sub" / "sheet.png", scene=s, cell=32, cols=10)
    with Image.open(path) as im:
        rows = -(-(len(EFFECTS) + 1) // 10)
        assert im.size == (10 * 32 + 11 * GAP, rows * (32 + label_height(32)) + (rows + 1) * GAP)


def test_mirror_flips_are_exact_symmetries() -> None:
    assert bench.mirror_flips("sepia") == (True, True)  # a colour grade looks the same in a mirror
    assert bench.mirror_flips("posterize") == (True, True)
    assert bench.mirror_flips("mirror_left") == (False, True)  # the left half is copied to the right
    assert bench.mirror_flips("pop_art_2x2") == (False, False)  # each quadrant has its own palette
