"""The studio page: one Gradio Blocks built from a registry of tabs, and how it is served.

Each tab is a module under ``studio/ui/`` with ``build(studio, app)``, called inside its
``gr.Tab``. To add a tab, write the module and add ``(title, builder)`` to ``TABS``.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable

import gradio as gr
from starlette.middleware import Middleware

from ..config import StudioConfig
from ..context import Studio
from . import (
    deploy_tab,
    distill_tab,
    effects_tab,
    evaluate_tab,
    guide,
    preview_tab,
    prompts_tab,
    runs_view,
    teachers_tab,
)
from .access import Access, AccessError, TokenCookieMiddleware, is_loopback, token_dependency

log = logging.getLogger(__name__)

TabBuilder = Callable[[Studio, gr.Blocks], None]


def _optional_tab(module: str) -> TabBuilder | None:
    """A tab module written separately (e.g. the user study), when it is present."""
    try:
        return importlib.import_module(f"{__package__}.{module}").build
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.{module}":
            raise
        return None


TABS: list[tuple[str, TabBuilder]] = [
    (title, builder)
    for title, builder in [
        ("Effects", effects_tab.build),
        ("Teachers", teachers_tab.build),
        ("Prompts", prompts_tab.build),
        ("Distill", distill_tab.build),
        ("Preview", preview_tab.build),
        ("Evaluate", evaluate_tab.build),
        ("Study", _optional_tab("study_tab")),
        ("Deploy", deploy_tab.build),
    ]
    if builder is not None
]

TITLE = "CollectionLoRA Studio"
MAX_UPLOAD = "600mb"  # a little above the pair-set zip limit, so the importer gives the message
CSS = """
#effects-error textarea { color: var(--error-text-color, #b91c1c); font-family: var(--font-mono); }
"""


def build_app(studio: Studio, tabs: list[tuple[str, TabBuilder]] | None = None) -> gr.Blocks:
    """The whole studio page over `studio` (tabs default to ``TABS``)."""
    # delete_cache: uploads and rendered previews in Gradio's temp folder go after a day.
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 86400)) as app:
        gr.Markdown(
            f"# {TITLE}\nOne LoRA for all your effects. Data: `{studio.config.data_dir}` · "
            f"backbone: `{studio.config.backbone}`"
        )
        hints: dict[str, gr.Markdown] = {}
        with gr.Tabs():
            for title, builder in tabs or TABS:
                tab_id = title.lower()
                with gr.Tab(title, id=tab_id) as tab:
                    if tab_id in guide.GUIDED_TABS:
                        hints[tab_id] = gr.Markdown(elem_id=f"{tab_id}-next-step")
                        tab.select(
                            lambda t=tab_id: _read_hints(studio, [t])[0],
                            outputs=hints[tab_id],
                            show_progress="hidden",
                        )
                    builder(studio, app)
        if hints:  # one reading of the studio fills every tab's hint when the page loads

            def on_load() -> tuple[str, ...] | str:
                texts = _read_hints(studio, list(hints))
                return tuple(texts) if len(texts) > 1 else texts[0]

            app.load(on_load, outputs=list(hints.values()), show_progress="hidden")
    return app


def _read_hints(studio: Studio, tab_ids: list[str]) -> list[str]:
    """The next-step hints (``guide``) of these tabs; a hint never breaks a tab (its own view reports a
    broken store), so a failure leaves them empty."""
    try:
        return guide.hints_for(studio, tab_ids)
    except Exception:
        log.exception("next-step hints for %s", ", ".join(tab_ids))
        return [""] * len(tab_ids)


def launch(
    config: StudioConfig, host: str = "127.0.0.1", port: int = 7860, auth: Access | None = None
) -> None:
    """Open the studio on `config` and serve it until interrupted (blocks)."""
    access = auth or Access()
    if access.open and not is_loopback(host):
        raise AccessError(f"Refusing to serve the studio on {host} without authentication.")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    studio = Studio.open(config)
    # Runs are independent processes: notice the ones that died while no UI was up; the tabs poll the rest.
    for run in runs_view.reattach(studio):
        log.info("re-attached to run %d (%s, %s)", run.id, run.name or run.kind, run.status)
    app = build_app(studio)
    kwargs: dict = {}
    if access.users:
        kwargs["auth"] = list(access.users)
        kwargs["auth_message"] = "CollectionLoRA Studio: sign in with the account you were given."
    if access.token:
        kwargs["auth_dependency"] = token_dependency(access.token)
        kwargs["app_kwargs"] = {"middleware": [Middleware(TokenCookieMiddleware, token=access.token)]}
    log.info("studio data in %s, serving on http://%s:%d", config.data_dir.resolve(), host, port)
    app.queue(default_concurrency_limit=4).launch(
        server_name=host,
        server_port=port,
        show_error=False,
        max_file_size=MAX_UPLOAD,
        footer_links=["api", "settings"],
        run_history=False,
        ssr_mode=False,
        css=CSS,
        **kwargs,
    )
