"""The HTTP layer of `dimple serve`: OpenAI's chat-completions API (streamed and not), `/v1/models`, `/health`, and the
`/load_model` handshake `transformers chat` opens with.

Requests are checked (`requests.py`, `media.py`) in a worker thread, decoded by the decoder (`decoding.py`), and
answered from the answer ids the way `generate()` + `post_process_image_text_to_text` answer in Python: the text ends
at the first end-of-text, `finish_reason` is "length" only when the answer filled its canvas. While a request
decodes, the app watches its connection; a client that leaves cancels its decoding at the next step.
"""

import asyncio
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..generation_config_dimple import DimpleGenerationConfig
from ..sampling_dimple import answer_lengths, stop_token_ids
from .decoding import Cancelled, Job
from .errors import RequestError, error_body, request_error_body, server_error_body
from .options import Limits
from .requests import ChatRequest, parse_chat_request

log = logging.getLogger("dimple.serve")


@dataclass
class Served:
    """What the app serves: one model under one name, its processor, the decoder and the operator's limits."""

    model: Any
    processor: Any
    name: str
    decoder: Any
    limits: Limits
    created: int
    # One request at a time in the processor: a fast tokenizer shared by threads can fail ("Already borrowed") when
    # calls overlap. Pictures are fetched and decoded before, outside this lock.
    processing: threading.Lock = field(default_factory=threading.Lock)

    @property
    def generation_defaults(self) -> DimpleGenerationConfig:
        config = self.model.generation_config
        return config if isinstance(config, DimpleGenerationConfig) else DimpleGenerationConfig.from_loaded(config)


def build_app(served: Served) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        served.decoder.shutdown()

    app = FastAPI(title="dimple serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)
    add_routes(app, served)
    return app


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse(request_error_body(error), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(error.detail), "invalid_request_error"), status_code=error.status_code)

    @app.exception_handler(Cancelled)
    async def stopping(request: Request, error: Cancelled) -> JSONResponse:
        body = error_body("The request was cancelled: the server is stopping.", "server_error", code="cancelled")
        return JSONResponse(body, status_code=503)


def add_routes(app: FastAPI, served: Served) -> None:
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(served)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        check_model_name(served, name, "model")
        return model_card(served)

    @app.post("/load_model")
    @answers_faults
    async def load_model(request: Request) -> StreamingResponse:
        """`transformers chat` asks the server to load its model first; this one serves one model, loaded."""
        body = await json_body(request, served.limits)
        check_model_name(served, body.get("model"), "model")
        ready = json.dumps({"status": "ready", "model": served.name, "cached": True})
        return StreamingResponse(iter([f"data: {ready}\n\n"]), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    @answers_faults
    async def chat_completions(request: Request) -> Response:
        body = await json_body(request, served.limits)
        check_model_name(served, body.get("model"), "model")
        chat, job = await asyncio.to_thread(prepared_job, body, served)
        future = served.decoder.submit(job)
        reply = Reply(served, chat, job)
        if chat.stream:
            return StreamingResponse(reply.events(future, request), media_type="text/event-stream")
        answer = await finished(future, request, job)
        return JSONResponse(reply.completion(answer)) if answer is not None else Response(status_code=499)


def answers_faults(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """A server fault becomes OpenAI's 500 body here, the traceback goes to the log, and the connection stays usable
    (Starlette's catch-all handler would answer, then re-raise and drop the client's keep-alive connection)."""

    @functools.wraps(handler)
    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except (RequestError, HTTPException, Cancelled):
            raise
        except Exception as error:
            log.error("request to %s failed", request.url.path, exc_info=error)
            return JSONResponse(server_error_body(), status_code=500)

    return guarded


def model_card(served: Served) -> dict:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "dimple"}


def check_model_name(served: Served, name: Any, param: str) -> None:
    if name != served.name:
        raise RequestError(
            f"The model {json.dumps(name)} is not served here; this server serves {json.dumps(served.name)} "
            "(see /v1/models).", param, status=404, code="model_not_found",
        )


async def json_body(request: Request, limits: Limits) -> dict:
    """The request's JSON object, read up to the byte limit."""
    declared = request.headers.get("content-length", "")
    too_big = RequestError(
        f"The request body is larger than this server's limit of {limits.max_request_bytes:,} bytes "
        "(--max-request-bytes).", status=413, code="request_too_large",
    )
    if declared.isdigit() and int(declared) > limits.max_request_bytes:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_request_bytes:
            raise too_big
    try:
        data = json.loads(body)
    except ValueError as error:
        raise RequestError(f"The request body is not valid JSON ({error}).") from error
    if not isinstance(data, dict):
        raise RequestError("The request body must be a JSON object.")
    return data


def prepared_job(body: dict, served: Served) -> tuple[ChatRequest, Job]:
    """Checks, pictures, chat template (client text escaped) and the prompt-length check, off the event loop."""
    chat = parse_chat_request(body, served.generation_defaults, served.limits)
    try:
        with served.processing:
            inputs = served.processor.apply_chat_template(
                chat.conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
                escape_special_tokens=True,
            )
    except ValueError as error:  # the processor's checks of pictures and text
        raise RequestError(f"The messages could not be prepared: {error}", "messages") from error
    answer_len = chat.settings.get("max_new_tokens", served.generation_defaults.max_new_tokens)
    prompt_len, positions = inputs["input_ids"].shape[1], served.model.config.max_position_embeddings
    if prompt_len + answer_len > positions:
        raise RequestError(
            f"The prompt ({prompt_len} tokens) plus the answer ({answer_len}) exceed the model's {positions} "
            "positions; shorten the messages or max_tokens.", "messages", code="context_length_exceeded",
        )
    device = served.model.device  # a walk to the first parameter: once, not per input
    inputs = {key: value.to(device) for key, value in inputs.items()}
    return chat, Job(dict(inputs), chat.settings, chat.seed)


async def finished(future: Future, request: Request, job: Job) -> torch.Tensor | None:
    """The answer ids, or None when the client left (its decoding is cancelled). Cancelled with the task too.

    The client's leaving is an event (the ASGI server's `http.disconnect`), not a poll: a pending request costs the
    event loop nothing while it decodes, and a client that hangs up frees its row at the engine's next step."""
    waiting = asyncio.wrap_future(future)
    # Take the outcome's exception even when nobody awaits it any more (client gone, task cancelled at shutdown).
    waiting.add_done_callback(lambda done: done.cancelled() or done.exception())
    leaving = asyncio.ensure_future(client_gone(request))
    try:
        await asyncio.wait({waiting, leaving}, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done() and leaving.exception() is not None:  # an ASGI server whose receive() failed
            log.warning("request %d: cannot watch its connection (%r); decoding on", job.number, leaving.exception())
            await asyncio.wait({waiting})
        if waiting.done():
            if waiting.cancelled():  # dropped from the decoder's queue at shutdown
                raise Cancelled(f"request {job.number}: cancelled before decoding")
            return waiting.result()
        log.info("request %d: client disconnected; cancelling its decoding", job.number)
        job.cancel()
        return None
    finally:
        leaving.cancel()
        if not future.done():
            job.cancel()


async def client_gone(request: Request) -> None:
    """Returns once the client has hung up. The body was read before, so the next ASGI message the server delivers
    is `http.disconnect`."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Reply:
    """The OpenAI bodies for one request's answer."""

    def __init__(self, served: Served, chat: ChatRequest, job: Job):
        self.served, self.chat, self.job = served, chat, job
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def answer(self, ids: torch.Tensor) -> tuple[str, int, str]:
        """Text up to the first end-of-text (as post-processing gives it), its token count, the finish reason."""
        length = int(answer_lengths(ids[None], stop_token_ids(self.served.model.config))[0])
        text = self.served.processor.post_process_image_text_to_text(ids[None, :length])[0]
        return text, length, "length" if length == ids.shape[0] else "stop"

    def usage(self, completion_tokens: int) -> dict:
        prompt_tokens = int(self.job.inputs["input_ids"].shape[1])
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def completion(self, ids: torch.Tensor) -> dict:
        text, length, reason = self.answer(ids)
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                  "logprobs": None}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.served.name,
                "choices": [choice], "usage": self.usage(length)}

    def chunk(self, delta: dict | None, reason: str | None = None, usage: dict | None = None) -> str:
        """One SSE chunk; `delta=None` is OpenAI's usage-only chunk (no choices)."""
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.served.name, "choices": choices, **({"usage": usage} if usage else {})}
        return f"data: {json.dumps(body)}\n\n"

    async def events(self, future: Future, request: Request) -> AsyncIterator[str]:
        """Server-sent events: the role at once, then the final answer (diffusion drafts rewrite earlier text,
        which OpenAI's append-only deltas cannot express), the finish reason with usage, OpenAI's usage-only chunk
        if asked, [DONE]."""
        try:
            yield self.chunk({"role": "assistant", "content": ""})
            ids = await finished(future, request, self.job)
        except Exception as error:  # noqa: BLE001 (the stream has begun: any error, ours or the client's, is an event)
            yield f"data: {json.dumps(stream_error(error, self.job))}\n\n"
            return
        finally:
            if not future.done():  # the response was closed before the answer came
                self.job.cancel()
        if ids is None:
            return
        text, length, reason = self.answer(ids)
        if text:
            yield self.chunk({"content": text})
        # The finish chunk carries usage too, as transformers' server sends it (`transformers chat` reads it there).
        yield self.chunk({}, reason, self.usage(length))
        if self.chat.include_usage:
            yield self.chunk(None, usage=self.usage(length))
        yield "data: [DONE]\n\n"


def stream_error(error: Exception, job: Job) -> dict:
    if isinstance(error, RequestError):
        return request_error_body(error)
    if isinstance(error, Cancelled):
        return error_body("The request was cancelled (the server is stopping).", "server_error", code="cancelled")
    log.error("request %d failed while streaming", job.number, exc_info=error)
    return server_error_body()
