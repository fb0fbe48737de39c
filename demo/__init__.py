"""`dimple demo`: a Gradio chat app that shows the answer canvas denoise, live (local tool, extra `.[demo]`).

settings.py reads the per-message settings, canvas.py records and draws the canvas step by step, turn.py runs one
chat turn (generate in a worker thread, drafts handed to the page), app.py lays out the page, space.py writes a
Hugging Face Space folder, command.py is the `dimple demo` subcommand. Only app.py and command.py import gradio.
"""
