"""Where decoding happens for the server: the one seam between HTTP and the model.

The app hands a `Job` (one request's processor output and settings) to a decoder and gets a `concurrent.futures.Future`
of the answer ids; `job.cancel()` (client gone, server stopping) makes decoding stop at its next step. Both decoders
honour that: `EngineDecoder` (the default) hands every job to one batching engine (`dimple.engine`), which decodes
concurrent requests together and drops a cancelled one at its next step; `SequentialDecoder` (`--no-batching`) runs
`generate()` one request at a time on one worker thread, with a draft streamer that raises at the step after a
cancel.

Which errors are the client's: generate() checks its inputs before the first step and raises `ValueError`/`TypeError`
naming the fix; those become `RequestError` (4xx). An error after decoding started is a server fault (5xx).
"""

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import torch

from .errors import RequestError

log = logging.getLogger("dimple.serve")
JOB_NUMBERS = count(1)


class Cancelled(Exception):
    """Decoding of a job stopped because its client left or the server is stopping."""


@dataclass(eq=False)  # identity: a job is one request
class Job:
    inputs: dict[str, Any]
    settings: dict[str, Any]
    seed: int | None = None
    number: int = field(default_factory=lambda: next(JOB_NUMBERS))
    cancelled: threading.Event = field(default_factory=threading.Event)
    on_cancel: list[Callable[[], Any]] = field(default_factory=list)

    def cancel(self) -> None:
        self.cancelled.set()
        for callback in self.on_cancel:
            callback()

    def describe(self) -> str:
        return f"request {self.number}: decoding (prompt {self.inputs['input_ids'].shape[1]} tokens, {self.settings})"


class StepCount:
    """generate()'s streamer protocol, used to watch decoding: `put` marks the start (all input checks passed),
    `put_draft` (once per step) counts steps; with `stop_on_cancel` it raises `Cancelled` at the step after a cancel
    (how `generate()` is stopped), otherwise `end` reports where the engine dropped the cancelled request."""

    def __init__(self, job: Job, stop_on_cancel: bool):
        self.job, self.stop_on_cancel, self.started, self.steps = job, stop_on_cancel, False, 0

    def put(self, ids: torch.Tensor) -> None:
        """Called with the prompt before the first step, and with the answer after the last."""
        if not self.started:
            self.started = True
            log.info(self.job.describe())
        self.check()

    def put_draft(self, canvas: torch.Tensor) -> None:
        self.steps += 1
        self.check()

    def end(self) -> None:
        if self.job.cancelled.is_set():
            log.info(self.stopped())

    def check(self) -> None:
        if self.stop_on_cancel and self.job.cancelled.is_set():
            raise Cancelled(self.stopped())

    def stopped(self) -> str:
        return f"request {self.job.number}: decoding stopped after {self.steps} steps (cancelled)"


def client_error(error: BaseException) -> BaseException:
    """generate()'s and the engine's refusals of a prompt or setting (ValueError/TypeError before decoding) are the
    client's mistakes; anything else stays what it is."""
    if isinstance(error, (ValueError, TypeError)):
        return RequestError(str(error), "generation_config")
    return error


class JobRegistry:
    """The jobs a decoder holds, so that shutdown can cancel every one of them (each stops at its next step)."""

    def __init__(self):
        self.jobs: set[Job] = set()
        self.lock = threading.Lock()

    def cancel_all(self) -> None:
        """Cancel every job: a running one stops at its next step, a waiting one never starts."""
        with self.lock:
            jobs = list(self.jobs)
        for job in jobs:
            job.cancel()


class SequentialDecoder(JobRegistry):
    """`generate()` for one job at a time, in arrival order, on one worker thread."""

    def __init__(self, model: Any, tokenizer: Any):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dimple-decode")

    def submit(self, job: Job) -> Future:
        with self.lock:
            self.jobs.add(job)
        return self.worker.submit(self.run, job)

    def run(self, job: Job) -> torch.Tensor:
        """The job's answer ids (1D: the whole canvas)."""
        streamer = StepCount(job, stop_on_cancel=True)
        try:
            streamer.check()  # a job cancelled while it waited never starts
            if job.seed is not None:
                torch.manual_seed(job.seed)
            with torch.inference_mode():
                out = self.model.generate(**job.inputs, **job.settings, tokenizer=self.tokenizer, streamer=streamer)
            return out[0, job.inputs["input_ids"].shape[1] :]
        except Cancelled as stop:
            log.info("%s", stop)
            raise
        except (ValueError, TypeError) as error:
            if streamer.started:
                raise
            raise client_error(error) from error
        finally:
            with self.lock:
                self.jobs.discard(job)

    def shutdown(self) -> None:
        self.cancel_all()
        self.worker.shutdown(wait=True, cancel_futures=True)


class EngineDecoder(JobRegistry):
    """Every job through one `DiffusionEngine`: concurrent requests decode together, sharing each step's passes, each
    with its own settings and seed, each answer the one it gets alone. A cancelled job leaves the batch at the next
    step."""

    def __init__(self, model: Any, tokenizer: Any, max_batch_size: int):
        from ..engine import DiffusionEngine

        super().__init__()
        self.engine, self.tokenizer = DiffusionEngine(model, max_batch_size=max_batch_size), tokenizer

    def submit(self, job: Job) -> Future:
        answer: Future = Future()
        try:
            request = self.engine.submit(
                job.inputs, streamer=StepCount(job, stop_on_cancel=False), seed=job.seed, tokenizer=self.tokenizer,
                **job.settings,
            )
        except (ValueError, TypeError) as error:
            answer.set_exception(client_error(error))
            return answer
        except RuntimeError as error:  # shut down meanwhile
            answer.set_exception(Cancelled(f"request {job.number}: the server is stopping ({error})"))
            return answer
        with self.lock:
            self.jobs.add(job)
        job.on_cancel.append(request.cancel)
        request.future.add_done_callback(lambda done: self.settle(job, done, answer))
        return answer

    def settle(self, job: Job, done: Future, answer: Future) -> None:
        with self.lock:
            self.jobs.discard(job)
        if done.cancelled():
            answer.set_exception(Cancelled(f"request {job.number}: cancelled"))
        elif done.exception() is not None:
            answer.set_exception(client_error(done.exception()))
        else:
            answer.set_result(done.result())

    def shutdown(self) -> None:
        self.cancel_all()
        self.engine.shutdown(wait=True, cancel_pending=True)
