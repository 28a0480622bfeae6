"""The Effects tab in a real browser: `python app.py` on a free port, driven by Playwright + Debian chromium.

Screenshots go to test-artifacts/ (gitignored) for a human to look at.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import pytest
from browser_server import running_studio
from PIL import Image, ImageDraw

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-gpu",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def _pair_zip(path: Path, n: int = 3) -> Path:
    """n source/target pairs: a coloured square, and the same square inverted (visibly different)."""
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(n):
            src = Image.new("RGB", (48, 48), (30 + 60 * i, 120, 200))
            ImageDraw.Draw(src).ellipse((12, 12, 36, 36), fill=(240, 200, 40))
            tgt = Image.eval(src, lambda v: 255 - v)
            for role, img in (("source", src), ("target", tgt)):
                buf = io.BytesIO()
                img.save(buf, "PNG")
                zf.writestr(f"square_{i}_{role}.png", buf.getvalue())
    return path


def _broken_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        buf = io.BytesIO()
        Image.new("RGB", (48, 48), (9, 9, 9)).save(buf, "PNG")
        zf.writestr("lonely_source.png", buf.getvalue())
    return path


def _bank_zip(path: Path) -> Path:
    """A bank of two folders: "Ocean Mist" (pairs + prompt) and "notes" (no pairs)."""
    pairs = zipfile.ZipFile(_pair_zip(path.with_name("pairs.zip")))
    with zipfile.ZipFile(path, "w") as zf:
        for info in pairs.infolist():
            zf.writestr(f"bank/Ocean Mist/pairs/{info.filename}", pairs.read(info))
        zf.writestr("bank/Ocean Mist/prompt.txt", "Add a sea mist.\n")
        zf.writestr("bank/notes/readme.md", "not an effect")
    return path


@pytest.fixture()
def studio_server(tmp_path):
    with running_studio(
        REPO, tmp_path / "data", tmp_path / "server.log", timeout=120
    ) as url:  # slow under load
        yield url


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)")
def test_upload_list_select_gallery_exclude(studio_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from studio.ui.services import bench_importer

    ARTIFACTS.mkdir(exist_ok=True)
    zip_path = _pair_zip(tmp_path / "browser fx.zip")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(20_000)
            page.goto(studio_server, timeout=120_000)

            # Empty library: the demo button shows exactly when the bench can be imported here.
            # the first render builds every tab: give a loaded machine time
            expect(page.locator("#effects-table")).to_be_visible(timeout=120_000)
            demo = page.locator("#demo-button")
            if bench_importer() is not None:
                expect(demo).to_be_visible()
            else:
                expect(demo).to_be_hidden()

            page.locator("#pairset-upload input[type=file]").set_input_files(str(zip_path))
            # the file row renders name and extension in separate spans ("browser fx .zip" as text)
            expect(page.locator("#pairset-upload")).to_contain_text(re.compile(r"browser fx\s*\.zip"))
            page.get_by_label("Teacher prompt").first.fill("Invert the colours.")
            page.locator("#import-button").click()

            expect(page.locator("#effects-notice")).to_contain_text("Imported browser-fx with 3 pairs")
            table = page.locator("#effects-table")
            expect(table).to_contain_text("browser-fx")
            expect(table).to_contain_text("Invert the colours.")
            page.screenshot(path=str(ARTIFACTS / "effects-imported.png"), full_page=True)

            # A fresh page shows what the database holds; select the effect from the list:
            # the gallery shows one source|target row per pair.
            page.reload()
            table = page.locator("#effects-table")
            expect(table).to_contain_text("browser-fx")
            expect(page.locator("#pairs-gallery")).to_be_hidden()
            table.get_by_text("browser-fx", exact=True).filter(visible=True).first.click()
            gallery = page.locator("#pairs-gallery")
            expect(gallery.locator("img")).to_have_count(3)
            expect(page.locator("#effect-summary")).to_contain_text("3 pairs used for training")

            # Click a pair, exclude it: the list and the summary count one fewer.
            gallery.locator("img").first.click()
            expect(page.locator("#pair-id input")).not_to_have_value("")
            page.locator("#exclude-pair").click()
            expect(page.locator("#effects-notice")).to_contain_text("excluded from training")
            expect(page.locator("#effect-summary")).to_contain_text("2 pairs used for training, 1 excluded")
            page.screenshot(path=str(ARTIFACTS / "effects-gallery.png"), full_page=True)

            # A broken pair set: the curator reads what is wrong in the error box.
            page.locator("#pairset-upload input[type=file]").set_input_files(
                str(_broken_zip(tmp_path / "broken.zip"))
            )
            expect(page.locator("#pairset-upload")).to_contain_text(re.compile(r"broken\s*\.zip"))
            page.locator("#import-button").click()
            error = page.locator("#effects-error textarea")
            expect(error).to_have_value(re.compile(r"^The pair set cannot be imported"))
            expect(error).to_have_value(re.compile(r"lonely_source\.png: source image without a target"))
            page.locator("#effects-error").screenshot(path=str(ARTIFACTS / "effects-error.png"))

            # A whole bank in one zip: a folder per effect; the one without pairs is skipped, said why.
            page.get_by_text("Import a whole LoRA bank").click()
            page.locator("#bank-upload input[type=file]").set_input_files(
                str(_bank_zip(tmp_path / "bank.zip"))
            )
            expect(page.locator("#bank-upload")).to_contain_text(re.compile(r"bank\s*\.zip"))
            page.locator("#bank-import").click()
            notice = page.locator("#effects-notice")
            expect(notice).to_contain_text("Imported 1 effect (0 with their LoRA as teacher): ocean-mist.")
            expect(notice).to_contain_text("skipped notes/: no pairs/ folder or pairs.zip")
            expect(page.locator("#effects-table")).to_contain_text("Add a sea mist.")
        finally:
            browser.close()
