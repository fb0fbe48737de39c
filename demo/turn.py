"""One chat turn: the conversation so far plus the new message, decoded in a worker thread by `model.generate`, or,
when the demo serves several visitors at once, as a request to the batching engine (`dimple.engine`), which decodes
the turns of all visitors together, sharing each step's forward passes.

Gradio runs each visitor's request in its own thread; decoding blocks, so it runs in a further thread per turn, and
every draft (already drawn as HTML on the decoding thread, so nothing is read while it changes) goes through a
queue to the request's generator, which passes it on to the page. Nothing here is shared between turns or visitors
except the model, which decoding only reads, and the engine.
"""

import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..image_processing_dimple import load_image, readable_image_errors
from .canvas import CanvasRecorder, canvas_html
from .settings import DemoSettings, generate_kwargs, template_ids

# Test-only: after the first step, decoding waits until the file this names exists, so a browser test can see (and
# photograph) a half-denoised canvas deterministically instead of racing the model.
HOLD_AFTER_FIRST_STEP = "DIMPLE_DEMO_HOLD_AFTER_FIRST_STEP"


class Stopped(Exception):
    """Raised inside `generate` (through the streamer) when the visitor has left: decoding stops early."""


@dataclass(frozen=True)
class RunRecord:
    """What the export draws: the answer canvas after every step, the structure prior (or None), the mask id."""

    drafts: tuple[torch.Tensor, ...]
    template: torch.Tensor | None
    mask_token_id: int


@dataclass(frozen=True)
class TurnResult:
    """A finished turn: the answer (cut at end-of-text), its statistics, and its record (for the export)."""

    answer: str
    forward_passes: int
    tokens_per_forward: float
    seconds: float
    run: RunRecord

    def stats(self) -> str:
        return (f"{self.forward_passes} forward passes \u00b7 {self.tokens_per_forward:.2f} tokens per forward "
                f"\u00b7 {self.seconds:.2f} s")


def user_message(text: str, image_paths: list[str]) -> dict:
    """The visitor's message as a chat-template turn: pictures first (read like any picture the processor gets),
    then the text."""
    if not text.strip() and not image_paths:
        raise ValueError("The message is empty; type a question (and add pictures if you like), then press Enter.")
    content: list[dict[str, Any]] = []
    for path in image_paths:
        try:
            with readable_image_errors():
                content.append({"type": "image", "image": load_image(path)})
        except (ValueError, OSError) as error:
            raise ValueError(f"Cannot read the picture {Path(path).name}: {error}") from None
    return {"role": "user", "content": content + [{"type": "text", "text": text}]}


def answer_text(processor, answer_ids: torch.Tensor, template: torch.Tensor | None) -> str:
    """The answer as the chat shows it: cut at end-of-text; with a template, its fixed text may follow slots filled
    with end-of-text, so those are dropped instead of cutting there."""
    if template is None:
        return processor.post_process_image_text_to_text(answer_ids)[0]
    return processor.batch_decode(answer_ids, skip_special_tokens=True)[0]


def wait_for_release(path: str, stop: threading.Event) -> None:
    while not os.path.exists(path) and not stop.wait(0.05):
        pass


def decode_turn(
    model, processor, conversation: list[dict], settings: DemoSettings, stop: threading.Event, engine: Any = None
) -> Iterator[str | TurnResult]:
    """Yield the canvas as HTML after every step, then the `TurnResult`; with `engine` (a `DiffusionEngine` over
    `model`), the turn is decoded there, together with the other visitors' turns.

    Raises `ValueError` (one readable line) for anything wrong with the message or the settings, found before the
    first step; a failure during decoding is re-raised as it is (a bug, for the server log).
    """
    tokenizer = processor.tokenizer
    template = template_ids(settings.template, tokenizer)
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(model.device)
    kwargs = generate_kwargs(settings, template)
    total_steps = settings.steps or kwargs["max_new_tokens"]
    events: queue.Queue = queue.Queue()
    hold = os.environ.get(HOLD_AFTER_FIRST_STEP)

    def on_draft(recorder: CanvasRecorder) -> None:
        if stop.is_set():
            raise Stopped
        events.put(("draft", canvas_html(recorder, tokenizer, total_steps)))
        if hold and recorder.step == 1:
            wait_for_release(hold, stop)

    recorder = CanvasRecorder(model.config.mask_token_id, template, on_draft)
    decode = run_generate if engine is None else run_on_engine
    worker = threading.Thread(
        target=decode, args=(engine or model, inputs, kwargs, recorder, events), name="dimple-demo-turn", daemon=True
    )
    worker.start()
    while True:
        kind, payload = events.get()
        if kind == "draft":
            yield payload
        elif kind == "error":
            if isinstance(payload, (ValueError, TypeError)) and not recorder.started:
                raise ValueError(str(payload).strip().splitlines()[0]) from payload
            raise payload
        else:
            answer_ids, seconds = payload
            yield canvas_html(recorder, tokenizer, total_steps, done=True)
            yield TurnResult(
                answer=answer_text(processor, answer_ids, template),
                forward_passes=recorder.step,
                tokens_per_forward=recorder.committed / max(recorder.step, 1),
                seconds=seconds,
                run=RunRecord(tuple(recorder.drafts), template, recorder.mask_token_id),
            )
            return


def run_generate(model, inputs: dict, kwargs: dict, recorder: CanvasRecorder, events: queue.Queue) -> None:
    """The worker thread: one `generate` call; its answer ids (or its exception) go onto the queue."""
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            sequences = model.generate(**inputs, **kwargs, streamer=recorder)
        events.put(("done", (sequences[:, inputs["input_ids"].shape[1]:], time.perf_counter() - start)))
    except BaseException as error:  # handed to the request's thread, which decides how to show it
        events.put(("error", error))


def run_on_engine(engine, inputs: dict, kwargs: dict, recorder: CanvasRecorder, events: queue.Queue) -> None:
    """The worker thread: the turn as one engine request, waited for; its answer ids (or its exception) go onto the
    queue. The recorder's drafts arrive on the engine's thread, and a visitor who left fails only this request."""
    start = time.perf_counter()
    try:
        answer = engine.submit(dict(inputs), streamer=recorder, **kwargs).result()
        events.put(("done", (answer[None], time.perf_counter() - start)))
    except BaseException as error:  # handed to the request's thread, which decides how to show it
        events.put(("error", error))
