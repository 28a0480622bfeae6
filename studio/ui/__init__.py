"""The studio's browser UI: Gradio Blocks over the same plain functions the CLI calls.

``studio.ui.app.build_app(studio)`` builds the page from the ``TABS`` registry; ``launch`` serves it.
"""
