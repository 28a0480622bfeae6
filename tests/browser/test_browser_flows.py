"""Every flow in a real browser: upload a pair set, train a tiny teacher, write prompts, distil, watch
the progress, preview an edit, export. ``python app.py`` on a free port over a random 2-layer tiny
backbone (``--model-path``), driven by Playwright + Debian chromium; training runs in real worker
processes. Screenshots go to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path

import pytest
from browser_server import running_studio
from PIL import Image

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu", "--no-first-run"]
RUN_TIMEOUT_MS = 240_000  # a worker process imports torch + diffusers first: slow on a busy 2-core box
TEACHER_SETTINGS = '{"batch": 2, "sample_every": 3, "sample_n": 2, "sample_steps": 2, "checkpoint_every": 3}'
DISTILL_SETTINGS = (
    '{"batch": 2, "coarse_ratio": 6.0, "target_steps": 2, "target_general_sources": 1, '
    '"checkpoint_every": 1, "sample_every": 1, "student_steps": 4, "student_lora": {"rank": 4, "alpha": 4.0}, '
    '"fake_lora": {"rank": 4, "alpha": 4.0}}'
)


def _sepia_zip(path: Path, n: int = 6) -> Path:
    """n EffectBench-mini scenes and their exact sepia edit, named like sepia_0_source.png."""
    from distill.effectbench.effects import get_effect
    from distill.effectbench.scenes import make_scene

    sepia = get_effect("sepia")
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(n):
            scene = make_scene("animal" if i % 2 else "portrait", 100 + i, size=32)
            for role, arr in (("source", scene.image), ("target", sepia(scene.image, scene.mask))):
                buf = io.BytesIO()
                Image.fromarray((arr.clip(0, 1) * 255 + 0.5).astype("uint8")).save(buf, "PNG")
                zf.writestr(f"sepia_{i}_{role}.png", buf.getvalue())
    return path


@pytest.fixture()
def flows_server(tmp_path):
    from distill.backbones.tiny import TinyConfig, TinyEditor

    weights = tmp_path / "tiny-random"
    TinyEditor.random(
        TinyConfig(num_layers=2, num_heads=2, head_dim=16, text_dim=32, text_layers=1)
    ).save_pretrained(weights)
    try:
        with running_studio(
            REPO, tmp_path / "data", tmp_path / "server.log", "--model-path", str(weights), timeout=300
        ) as url:
            yield url, tmp_path / "data"
    finally:
        _stop_workers(tmp_path / "data")


def _stop_workers(data_dir: Path) -> None:
    """Workers outlive the UI by design; end the ones this test started (by their recorded pids)."""
    import signal

    from studio.config import StudioConfig
    from studio.context import Studio
    from studio.runs import list_runs

    if not data_dir.exists():
        return
    for run in list_runs(Studio.open(StudioConfig(data_dir=data_dir))):
        if run.pid and not run.finished:
            try:
                os.kill(run.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)")
@pytest.mark.timeout(1500)  # real worker runs: about 3 min on a quiet 2-core machine
def test_upload_train_distil_preview_export(flows_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from distill.export import read_catalog

    url, _data = flows_server
    expect.set_options(timeout=90_000)  # generous: the CI box may be busy
    ARTIFACTS.mkdir(exist_ok=True)
    zip_path = _sepia_zip(tmp_path / "sepia.zip")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.set_default_timeout(90_000)
        try:
            page.goto(url, timeout=120_000)

            # 1. Effects: upload the pair set.
            page.locator("#pairset-upload input[type=file]").set_input_files(str(zip_path))
            expect(page.locator("#pairset-upload")).to_contain_text("sepia.zip")
            page.get_by_label("Teacher prompt").first.fill("Give the photo a warm sepia tone.")
            page.locator("#import-button").click()
            expect(page.locator("#effects-notice")).to_contain_text("Imported sepia with 6 pairs")

            # 2. Teachers: a 3-step training in a worker; the progress bar reaches "Done". Preview first
            # says it has nothing to show yet.
            page.get_by_role("tab", name="Preview").click()
            expect(page.locator("#preview-next-step")).to_contain_text("No finished CollectionLoRA yet")
            page.get_by_role("tab", name="Teachers").click()
            expect(page.locator("#teachers-table")).to_contain_text("none yet")
            page.locator("#teachers-steps input").fill("3")
            page.locator("#teachers-extra textarea").fill(TEACHER_SETTINGS)
            page.locator("#teachers-train").click()
            expect(page.locator("#teachers-notice")).to_contain_text("teacher of sepia, 3 steps")
            progress = page.locator("#teachers-progress")
            expect(progress).to_contain_text("Run 1")
            page.screenshot(path=str(ARTIFACTS / "flows-teacher-started.png"), full_page=True)
            expect(progress).to_contain_text("Done", timeout=RUN_TIMEOUT_MS)
            expect(progress).to_contain_text("100%")
            expect(progress).to_contain_text("step 3 / 3")
            expect(page.locator("#teachers-table")).to_contain_text("trained")
            expect(page.locator("#teachers-samples img")).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "flows-teacher-done.png"), full_page=True)
            page.get_by_text("Check a teacher against the base model").click()
            page.locator("#teachers-check").click()
            expect(page.locator("#teachers-check-result")).to_contain_text(
                "over the base model given the same prompt", timeout=120_000
            )

            # 3. Prompts: a trigger and a student prompt for the effect (Distill says it needs them).
            page.get_by_role("tab", name="Distill").click()
            expect(page.locator("#distill-next-step")).to_contain_text(
                "sepia still needs a trigger word and a student prompt"
            )
            page.get_by_role("tab", name="Prompts").click()
            page.locator("#prompts-generate").click()
            expect(page.locator("#prompts-notice")).to_contain_text("Wrote 1 student prompt", timeout=60_000)

            # 4. Distill: launch a 2-step run, watch it to the end (curves, samples, history).
            page.get_by_role("tab", name="Distill").click()
            expect(page.locator("#distill-next-step")).not_to_contain_text("still needs")
            expect(page.locator("#distill-effects input[type=checkbox]").first).to_be_checked()
            page.locator("#distill-steps input").fill("2")
            page.locator("#distill-critic input").fill("1")
            page.locator("#distill-extra textarea").fill(DISTILL_SETTINGS)
            page.locator("#distill-launch").click()
            expect(page.locator("#distill-notice")).to_contain_text(
                "distilling 1 effect into one LoRA, 2 steps after 12 coarse steps (TA-FM alone)"
            )
            dprogress = page.locator("#distill-progress")
            expect(dprogress).to_contain_text("Run 2")
            expect(dprogress).to_contain_text("Done", timeout=RUN_TIMEOUT_MS)
            expect(dprogress).to_contain_text("step 14 / 14")  # the coarse stage first (6 per step)
            expect(page.locator("#distill-history")).to_contain_text("succeeded")
            expect(page.locator("#distill-samples img").first).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "flows-distill-done.png"), full_page=True)

            # 5. Preview: the student beside the teacher on a bench test source, NFE and time shown.
            page.get_by_role("tab", name="Preview").click()
            expect(page.locator("#preview-next-step")).not_to_contain_text("No finished")
            expect(page.locator("#preview-run input")).to_have_value(re.compile(r"^run #2 "))
            page.locator("#preview-run-button").click()
            notes = page.locator("#preview-notes")
            expect(notes).to_contain_text("Student (CollectionLoRA) · 4 NFE", timeout=60_000)
            expect(notes).to_contain_text("Teacher · 80 NFE")
            expect(page.locator("#preview-gallery img")).to_have_count(4)  # input, truth, student, teacher
            page.screenshot(path=str(ARTIFACTS / "flows-preview.png"), full_page=True)

            # 6. Deploy: export the one file; the catalog comes from its metadata.
            page.get_by_role("tab", name="Deploy").click()
            page.locator("#deploy-export").click()
            link = page.locator("#deploy-file a")
            expect(link).to_have_attribute(
                "href", re.compile(r"/collectionlora-run2-diffusers\.safetensors$")
            )
            with page.expect_download() as download:
                link.click()
            saved = tmp_path / "downloaded.safetensors"
            download.value.save_as(saved)
            assert [e.name for e in read_catalog(saved).entries] == ["sepia"]  # the file carries its catalog
            expect(page.locator("#deploy-catalog")).to_contain_text("sepia")
            expect(page.locator("#deploy-cost")).to_contain_text("one student file")
            page.screenshot(path=str(ARTIFACTS / "flows-deploy.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "flows-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
            expect.set_options(timeout=5_000)  # Playwright's default, for the other browser tests
