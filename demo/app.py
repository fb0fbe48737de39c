"""The page: chat with pictures on the left, the live answer canvas under it, per-message settings on the right.

`build_app(model, processor)` returns the Gradio Blocks; `launch(app, host, port)` serves it through Gradio's queue.
Each visitor's conversation and last run live in their own `gr.State` (Gradio copies the initial value per
session), so nothing is shared between visitors except the model. Every problem a visitor can cause (an empty
message, an unreadable picture, a bad setting, a prompt the processor refuses) is shown as one line of text above
the canvas; failures of our own are logged with their traceback and shown as one line too.
"""

import html
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from transformers.utils import logging

from ..generation_config_dimple import ALGORITHMS
from ..visualize import denoising_cells, render_gif, render_html
from .canvas import CANVAS_STYLE, idle_canvas_html
from .settings import DemoSettings, parse_settings, settings_from_config
from .turn import RunRecord, TurnResult, decode_turn, user_message

logger = logging.get_logger(__name__)

INTRO = (
    "### Chat with Dimple, and watch it denoise\n"
    "Add pictures, type a question, press Enter. Dimple starts from an answer made of masks and unmasks it over a "
    "few forward passes; the canvas below shows every step, each token shaded by the step that committed it."
)
PAGE_STYLE = CANVAS_STYLE + "\n#dimple-status .problem { color: #b00020; font-weight: 600; }\n"
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the page works offline


@dataclass(frozen=True)
class ChatSession:
    """One visitor's conversation (chat-template turns, pictures included) and their last finished run."""

    turns: tuple[dict, ...] = ()
    last_run: RunRecord | None = None


def problem(text: str) -> str:
    return f'<span class="problem">{html.escape(text)}</span>'


def shown_user_message(text: str, paths: list[str]) -> list[dict]:
    """The visitor's message as the chat shows it: each picture, then the text."""
    return [{"role": "user", "content": {"path": path}} for path in paths] + [{"role": "user", "content": text}]


def shown_answer(result: TurnResult) -> list[dict]:
    answer = result.answer or "(empty answer: the model wrote end-of-text first)"
    return [{"role": "assistant", "content": answer}, {"role": "assistant", "content": f"*{result.stats()}*"}]


def export_run(run: RunRecord | None, tokenizer) -> list[str]:
    """The last run's denoising as an animated GIF and a self-contained HTML page (`dimple.visualize`)."""
    if run is None:
        raise ValueError("Nothing to export yet: ask something first, then export its denoising.")
    frames = denoising_cells(run.drafts, tokenizer, run.mask_token_id, 0, run.template)
    folder = Path(tempfile.mkdtemp(prefix="dimple-demo-"))
    gif, page = folder / "denoising.gif", folder / "denoising.html"
    render_gif(frames, gif)
    render_html(frames, page)
    return [str(gif), str(page)]


class DemoChat:
    """The page's event handlers over one loaded model; all per-visitor data comes and goes through `ChatSession`."""

    def __init__(self, model, processor, engine: Any = None):
        self.model, self.processor, self.engine = model, processor, engine

    def respond(self, message: dict | None, history: list, session: ChatSession, *fields: Any):
        """Send the message with the conversation so far; yields (chat, canvas, status, session, input box)."""
        message = message or {}
        text, paths = message.get("text") or "", list(message.get("files") or [])
        try:
            settings = parse_settings(*fields)
            turn = user_message(text, paths)
        except ValueError as error:
            yield history, gr.skip(), problem(str(error)), session, gr.skip()
            return
        shown = list(history) + shown_user_message(text, paths)
        conversation = [*session.turns, turn]
        stop = threading.Event()
        try:
            for update in decode_turn(self.model, self.processor, conversation, settings, stop, self.engine):
                if isinstance(update, TurnResult):
                    result = update
                else:
                    yield shown, update, "Denoising\u2026", session, None
        except ValueError as error:
            yield history, idle_canvas_html(), problem(str(error)), session, message
            return
        except Exception as error:  # our fault: the traceback goes to the server log, one line to the page
            logger.error("Decoding failed", exc_info=error)
            failure = problem(f"Decoding failed ({type(error).__name__}); see the server log.")
            yield history, gr.skip(), failure, session, message
            return
        finally:
            stop.set()  # also when the visitor leaves mid-answer: decoding stops at its next step
        answer_turn = {"role": "assistant", "content": [{"type": "text", "text": result.answer}]}
        session = ChatSession(turns=(*conversation, answer_turn), last_run=result.run)
        yield shown + shown_answer(result), gr.skip(), f"Done: {result.stats()}.", session, None

    def export(self, session: ChatSession):
        try:
            files = export_run(session.last_run, self.processor.tokenizer)
        except ValueError as error:
            return None, problem(str(error))
        return files, "Exported the last run's denoising as a GIF and an HTML page."

    @staticmethod
    def clear():
        return [], idle_canvas_html(), "", ChatSession(), None, None


def settings_fields(defaults: DemoSettings) -> list[gr.components.Component]:
    """The settings column, in `parse_settings`' order, starting at the model's own generation config."""
    return [
        gr.Number(defaults.answer_length, label="Answer length (tokens)", elem_id="setting-length"),
        gr.Number(defaults.steps or 0, label="Steps (0: one per answer token)", elem_id="setting-steps"),
        gr.Number(defaults.threshold, label="Confident-decoding threshold (0: off)", elem_id="setting-threshold"),
        gr.Dropdown(list(ALGORITHMS), value=defaults.algorithm, label="Algorithm", elem_id="setting-algorithm"),
        gr.Number(defaults.temperature, label="Temperature (0: greedy)", elem_id="setting-temperature"),
        gr.Number(defaults.top_p, label="Top-p", elem_id="setting-top-p"),
        gr.Checkbox(defaults.use_cache, label="Prefix cache", elem_id="setting-cache"),
        gr.Textbox(label="Structure prior (template with <|mask|> slots; sets the length)",
                   placeholder='{"colour": "<|mask|><|mask|>"}', elem_id="setting-template"),
    ]


def build_app(model, processor, title: str = "Dimple", engine: Any = None) -> gr.Blocks:
    """The page over one loaded model; with `engine` (a `DiffusionEngine` over it), visitors' turns decode together."""
    handlers = DemoChat(model, processor, engine)
    with gr.Blocks(title=f"{title} demo", analytics_enabled=False) as app:  # no calls home
        session = gr.State(ChatSession())
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=3):
                chat = gr.Chatbot(
                    label="Chat", elem_id="dimple-chat", height=360, feedback_options=None, buttons=["copy"]
                )
                box = gr.MultimodalTextbox(
                    elem_id="dimple-input", file_count="multiple", file_types=["image"], sources=["upload"],
                    placeholder="Add pictures (button or paste), type a question, press Enter", show_label=False,
                )
                status = gr.Markdown(elem_id="dimple-status")
                canvas = gr.HTML(idle_canvas_html(), elem_id="dimple-canvas", js_on_load=None)
                with gr.Row():
                    clear_button = gr.Button("Clear", elem_id="dimple-clear")
                    export_button = gr.Button("Export last run (GIF + HTML)", elem_id="dimple-export-button")
                files = gr.File(label="Exported denoising", file_count="multiple", elem_id="dimple-export")
            with gr.Column(scale=1):
                gr.Markdown(f"**Settings** (applied to each message) \u00b7 model: `{title}`")
                fields = settings_fields(settings_from_config(model.generation_config))
        box.submit(handlers.respond, [box, chat, session, *fields], [chat, canvas, status, session, box])
        export_button.click(handlers.export, [session], [files, status])
        clear_button.click(handlers.clear, None, [chat, canvas, status, session, box, files])
    return app


def launch(app: gr.Blocks, host: str, port: int, concurrency: int = 1) -> None:
    """Serve `app` on host:port through Gradio's queue, print the address, and block until stopped."""
    app.queue(default_concurrency_limit=concurrency)
    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=["ui-monospace", "monospace"])
    app.launch(
        server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False, css=PAGE_STYLE,
        theme=theme, footer_links=[],
    )
    sys.stdout.write(f"Dimple demo running on http://{host}:{port} (Ctrl+C stops it)\n")
    sys.stdout.flush()
    app.block_thread()
