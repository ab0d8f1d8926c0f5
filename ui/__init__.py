"""The pivot-edit web app (Gradio): ``from ui.app import build_demo``."""
