"""The web app (`uniimage-app`): `engine` (checked requests over the library's sampler and
answerer, PNGs with their settings, compile timing; no web code) and `ui` (the Gradio page)."""
