"""Many requests decoded together, their steps sharing forward passes (a local tool, not remote code).

A server decoding requests one after another has the throughput of one request. Diffusion decoding batches well: a
step is one forward pass over every answer slot, and on a GPU a 7B step at batch 1 is bound by streaming the weights,
so eight requests cost little more than one. `DiffusionEngine` keeps a queue of requests and a scheduler thread that,
at every step, runs the forward passes of all active requests together (one, or two when some rows read their whole
sequence). New requests join at step boundaries (their first pass reads their whole sequence and fills their part of
the cache), finished ones leave at once. Each request keeps its
own settings (answer length, steps, threshold, algorithm, temperature/top-p, seed) because every rule after the
forward pass runs per request, through the model's public seam `start_decoding` (`DiffusionDecoding`): a greedy answer
is the one `generate()` gives the same request alone.

Layout of a step: the active requests are rows, right-aligned to the longest (left padding, masked out of attention).
Rows that recompute their whole sequence this step (a request's first pass, a block's first step) and rows that
recompute one block's window go through separate forward passes, each feeding the columns from its rows' earliest
window start to the end; each row writes keys/values only inside its own window (`BatchWindowCache`), so columns
outside it keep what that request's own earlier passes computed, as its prefix cache would alone. (One pass for all
would feed every row the widest span: each arriving request would make the whole batch recompute its prompts.)
"""

import threading
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, InvalidStateError, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import torch
from transformers.cache_utils import Cache
from transformers.utils import logging

from .cache_dimple import DimpleWindowLayer

logger = logging.get_logger(__name__)

# A request's answer comes back as ids; these settings ask for a richer `generate()` output the engine does not build.
OUTPUT_SETTINGS = ("return_dict_in_generate", "output_history", "output_scores")


class BatchWindowLayer(DimpleWindowLayer):
    """One decoder layer's keys/values for every active row, right-aligned to `length` columns.

    A forward feeds columns [window_start, window_start + n) of the rows `rows` (a slice, or an index tensor when
    they are not contiguous); `write` (those rows, n) says which of the columns a row recomputes this step. The
    others keep their cached states, and attention reads the buffers after the write, so each row sees exactly what
    its own prefix cache would hold.
    """

    def __init__(self):
        super().__init__()
        self.length = self.batch = 0
        self.write: torch.Tensor | None = None
        self.rows: slice | torch.LongTensor = slice(None)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(self.batch, key_states.shape[1], self.length, key_states.shape[-1])
        self.values = value_states.new_zeros(self.batch, value_states.shape[1], self.length, value_states.shape[-1])
        self.is_initialized = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        window = slice(self.window_start, self.window_start + key_states.shape[-2])
        write = self.write[:, None, :, None]
        if isinstance(self.rows, slice):  # a view: the write lands in the buffers
            keys, values = self.keys[self.rows], self.values[self.rows]
            keys[..., window, :] = torch.where(write, key_states, keys[..., window, :])
            values[..., window, :] = torch.where(write, value_states, values[..., window, :])
            return keys, values
        rows = self.rows.to(self.keys.device)
        self.keys[rows, :, window] = torch.where(write, key_states, self.keys[rows, :, window])
        self.values[rows, :, window] = torch.where(write, value_states, self.values[rows, :, window])
        return self.keys[rows], self.values[rows]

    def rearrange(self, kept: torch.LongTensor, added: int, length: int) -> None:
        """Keep rows `kept` (in that order), append `added` empty rows, re-align every row to `length` columns."""
        old_length, self.length, self.batch = self.length, length, len(kept) + added
        if not self.is_initialized:
            return
        for name in ("keys", "values"):
            old = getattr(self, name)[kept.to(self.device)]
            new = old.new_zeros(old.shape[0] + added, old.shape[1], length, old.shape[-1])
            shift = length - old_length
            new[: old.shape[0], :, max(shift, 0) :] = old[:, :, max(-shift, 0) :]
            setattr(self, name, new)


class BatchWindowCache(Cache):
    """The engine's key/value cache: one `BatchWindowLayer` per decoder layer, moved together."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[BatchWindowLayer() for _ in range(num_layers)])

    def set_step(self, rows: slice | torch.LongTensor, window_start: int, write: torch.Tensor) -> None:
        """The next forward feeds rows `rows`, columns from `window_start`; `write` marks what each row recomputes."""
        for layer in self.layers:
            layer.rows, layer.window_start, layer.write = rows, window_start, write

    def rearrange(self, kept: list[int], added: int, length: int) -> None:
        kept_rows = torch.tensor(kept, dtype=torch.long)
        for layer in self.layers:
            layer.rearrange(kept_rows, added, length)


class SeededStream:
    """A request's own random stream: its sampling draws what it would after `torch.manual_seed(seed)` alone."""

    def __init__(self, seed: int):
        self.seed, self.states = seed, None

    @contextmanager
    def active(self) -> Iterator[None]:
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            if self.states is None:
                torch.manual_seed(self.seed)
            else:
                torch.set_rng_state(self.states[0])
                for device, state in zip(devices, self.states[1:]):
                    torch.cuda.set_rng_state(state, device)
            yield
            self.states = [torch.get_rng_state()] + [torch.cuda.get_rng_state(device) for device in devices]


class EngineRequest:
    """A submitted request: `result()` waits for its answer, `cancel()` drops it at the next step.

    `future` is the `concurrent.futures.Future` underneath (for `asyncio.wrap_future` or done callbacks).
    """

    def __init__(self, engine: "DiffusionEngine", arguments: dict[str, Any], streamer: Any, seed: int | None):
        self.engine, self.arguments, self.streamer = engine, arguments, streamer
        self.random = SeededStream(seed) if seed is not None else None
        self.future: Future = Future()

    def result(self, timeout: float | None = None) -> torch.LongTensor:
        """The answer ids (1-D, after the prompt, as `generate()` returns them); raises the request's own error,
        `concurrent.futures.CancelledError` after `cancel()`, `TimeoutError` after `timeout` seconds."""
        return self.future.result(timeout)

    def done(self) -> bool:
        return self.future.done()

    def cancel(self) -> bool:
        """Give up on the answer (a client that left): True if it is cancelled, False if it was already answered
        or failed (as `Future.cancel`). The engine frees the row at its next step."""
        cancelled = self.future.cancel()
        if cancelled:
            self.engine._wake()
        return cancelled

    def fail(self, error: BaseException) -> None:
        self._settle(error=error)

    def _settle(self, answer: torch.LongTensor | None = None, error: BaseException | None = None) -> None:
        """Deliver the outcome unless the client cancelled meanwhile; a streamer is ended either way."""
        try:
            if error is None:
                self.future.set_result(answer)
            else:
                self.future.set_exception(error)
        except InvalidStateError:
            pass  # cancelled by the client meanwhile: nobody waits for the outcome
        if error is not None or self.future.cancelled():
            end_streamer(self.streamer)


def end_streamer(streamer: Any) -> None:
    """Unblock a streamer's reader (TextIteratorStreamer waits for `end`) after a failure or a cancellation."""
    if streamer is None:
        return
    try:
        streamer.end()
    except Exception as error:  # the request already failed; its streamer's own error must not hide that
        logger.warning(f"A streamer raised while being ended: {error!r}")


@dataclass(eq=False)
class ActiveRow:
    """A request being decoded: its handle and its decoding state (`DiffusionDecoding`)."""

    request: EngineRequest
    decoding: Any
    rule: tuple | None = field(default=None, init=False)  # the step-independent part of `shared_rule_key`, once

    @contextmanager
    def random_stream(self) -> Iterator[None]:
        if self.request.random is None:
            yield
        else:
            with self.request.random.active():
                yield


class DiffusionEngine:
    """Continuous batching for diffusion decoding: `submit` requests from any thread, a scheduler thread decodes
    them together, every step's forward passes shared by all active requests.

    Args:
        model: a loaded Dimple (`DimpleModel` or its remote-code twin), in eval mode.
        max_batch_size: most requests decoded together; later ones wait, served in submission order.
        memory_budget: bytes the batch's key/value cache may take (rows x longest sequence x bytes per position);
            the request at the head of the queue waits until it fits, and one that cannot fit even alone fails.
            None: no limit beyond `max_batch_size`.
    Use as a context manager, or call `shutdown()`.
    """

    def __init__(self, model: Any, max_batch_size: int = 8, memory_budget: int | None = None):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}.")
        if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                          or memory_budget < 1):
            raise ValueError(f"memory_budget must be a positive number of bytes or None, got {memory_budget!r}.")
        if not callable(getattr(model, "start_decoding", None)):
            raise TypeError(
                f"DiffusionEngine needs a Dimple model with `start_decoding` (this package's code), got "
                f"{type(model).__name__}; load it after `import dimple`, or switch its folder with "
                "`dimple install-code`."
            )
        self.model, self.max_batch_size, self.memory_budget = model, max_batch_size, memory_budget
        self.forward_passes = 0  # forward passes run so far, each over one or more rows (tests and benchmarks read it)
        self._rows: list[ActiveRow] = []
        self._held: deque[ActiveRow] = deque()  # prepared, next in line (waiting for room or memory)
        self._waiting: deque[EngineRequest] = deque()
        self._lock = threading.Condition()
        self._stopping = self._cancel_pending = False
        self._cache = BatchWindowCache(model.config.num_hidden_layers)
        self._thread = threading.Thread(target=self._run, name="dimple-engine", daemon=True)
        self._thread.start()

    def __enter__(self) -> "DiffusionEngine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown(wait=True, cancel_pending=exc_info[0] is not None)

    @property
    def active(self) -> int:
        """Requests being decoded now."""
        return len(self._rows)

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet decoding."""
        with self._lock:
            return len(self._waiting) + len(self._held)

    def submit(
        self, inputs: Mapping[str, Any], generation_config: Any = None, streamer: Any = None,
        seed: int | None = None, **settings,
    ) -> EngineRequest:
        """Queue one request: `inputs` is the processor's output for ONE prompt (input_ids, attention_mask,
        pixel_values, image_grid_thw); settings as `generate()` takes them, plus `seed` (its sampling then draws
        what it would after `torch.manual_seed(seed)` alone). Returns at once; errors in the settings or the prompt
        come from `result()`."""
        arguments = checked_request_arguments(inputs, generation_config, settings)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
        request = EngineRequest(self, arguments, streamer, seed)
        with self._lock:
            if self._stopping:
                raise RuntimeError("This DiffusionEngine was shut down; create a new one to submit requests.")
            self._waiting.append(request)
            self._lock.notify()
        return request

    def generate_batch(self, inputs: list[Mapping[str, Any]], progress_bar: bool = True, **settings) -> list:
        """Submit every request, wait for all, return the answers in input order (see `generate_batch`)."""
        requests = [self.submit(one, **settings) for one in inputs]
        try:
            from tqdm.auto import tqdm

            with tqdm(total=len(requests), disable=not progress_bar, desc="dimple") as bar:
                for _ in as_completed([request.future for request in requests]):
                    bar.update(1)
            return [request.result() for request in requests]
        finally:
            for request in requests:
                request.cancel()

    def shutdown(self, wait: bool = True, cancel_pending: bool = False) -> None:
        """Stop taking requests. The scheduler finishes every submitted request (or, with `cancel_pending`,
        cancels them) and exits; `wait` blocks until it has."""
        with self._lock:
            self._stopping = True
            self._cancel_pending = self._cancel_pending or cancel_pending
            self._lock.notify()
        if wait:
            self._thread.join()

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    def _run(self) -> None:
        """The scheduler: drop cancelled requests, admit waiting ones, run one step; until shut down and drained."""
        with torch.no_grad():
            while self._next_round():
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self._rows:
                        self._step()
                except Exception as error:  # a fault of the shared pass, not of one request: fail the batch in it
                    logger.error(f"A batched decoding step failed; its {len(self._rows)} request(s) fail: {error!r}")
                    for row in self._rows:
                        row.request.fail(error)
                    self._remove(self._rows)

    def _next_round(self) -> bool:
        """Wait for work; False once shut down with nothing left. Cancels everything on `cancel_pending`."""
        with self._lock:
            while not (self._rows or self._held or self._waiting or self._stopping):
                self._lock.wait()
            if self._cancel_pending:
                for request in [*self._waiting, *(row.request for row in [*self._held, *self._rows])]:
                    request.future.cancel()
            return bool(self._rows or self._held or self._waiting) or not self._stopping

    def _drop_cancelled(self) -> None:
        """Requests whose client gave up leave now: their rows are freed before the next pass."""
        with self._lock:
            dropped = [request for request in self._waiting if request.future.cancelled()]
            self._waiting = deque(request for request in self._waiting if not request.future.cancelled())
        dropped += [row.request for row in self._held if row.request.future.cancelled()]
        self._held = deque(row for row in self._held if not row.request.future.cancelled())
        cancelled_rows = [row for row in self._rows if row.request.future.cancelled()]
        for request in dropped + [row.request for row in cancelled_rows]:
            end_streamer(request.streamer)
        self._remove(cancelled_rows)

    def _admit(self) -> None:
        """Move waiting requests, in order, into the batch while it has room (`max_batch_size`, `memory_budget`)."""
        room = self.max_batch_size - len(self._rows)
        if len(self._held) < room:
            self._held.extend(self._prepare(self._take(room - len(self._held))))
        joined: list[ActiveRow] = []
        while self._held and len(joined) < room:
            row = self._held[0]
            if row.decoding.done:  # nothing to fill (a template without masks)
                self._finish(self._held.popleft())
                continue
            if not self._fits([*self._rows, *joined, row]):
                if self._rows or joined:
                    break
                self._held.popleft().request.fail(ValueError(
                    f"This request's {row.decoding.length} positions need {self._cache_bytes([row])} bytes of "
                    f"key/value cache, more than the engine's memory_budget ({self.memory_budget}); shorten the "
                    "prompt or the answer, or raise memory_budget."
                ))
                continue
            joined.append(self._held.popleft())
        if joined:
            length = max(row.decoding.length for row in [*self._rows, *joined])
            self._cache.rearrange(list(range(len(self._rows))), len(joined), length)
            self._rows.extend(joined)

    def _take(self, count: int) -> list[EngineRequest]:
        """Up to `count` waiting requests, oldest first (cancelled ones are dropped on the way)."""
        taken = []
        with self._lock:
            while self._waiting and len(taken) < count:
                request = self._waiting.popleft()
                if request.future.cancelled():
                    end_streamer(request.streamer)
                else:
                    taken.append(request)
        return taken

    def _prepare(self, requests: list[EngineRequest]) -> list[ActiveRow]:
        """Prepare requests joining together (settings resolved, prompt checked and embedded): their pictures go
        through the vision tower in one call. A request whose settings or prompt are refused fails alone."""
        encode_images_together(self.model, requests)
        rows = []
        for request in requests:
            arguments, request.arguments = request.arguments, None
            try:
                rows.append(ActiveRow(request, self.model.start_decoding(streamer=request.streamer, **arguments)))
            except Exception as error:
                request.fail(error)
        return rows

    def _cache_bytes(self, rows: list[ActiveRow]) -> int:
        """Key/value cache of a batch: rows x longest sequence x bytes per position (all layers, keys and values)."""
        config = self.model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per_position = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * self.model.dtype.itemsize
        return len(rows) * max(row.decoding.length for row in rows) * per_position

    def _fits(self, rows: list[ActiveRow]) -> bool:
        return self.memory_budget is None or self._cache_bytes(rows) <= self.memory_budget

    def _step(self) -> None:
        """One step for every active row: the forward passes, then each row commits its tokens by its own settings.

        Rows recomputing their whole sequence (a request's first pass, a block's first step) and rows recomputing
        one block's window go through separate passes: fed together, every row would be fed the widest span, so one
        joining request would make the whole batch recompute its prompts.
        """
        length = self._cache.layers[0].length
        spans = [batch_span(row.decoding, length) for row in self._rows]
        whole = [index for index, (offset, start, _) in enumerate(spans) if start == offset]
        windowed = [index for index, (offset, start, _) in enumerate(spans) if start != offset]
        logits: list[torch.Tensor | None] = [None] * len(self._rows)
        for group in (whole, windowed):
            if group:
                for index, row_logits in zip(group, self._forward(group, [spans[index] for index in group])):
                    logits[index] = row_logits
        self._commit(logits)

    def _forward(self, group: list[int], spans: list[tuple[int, int, int]]) -> tuple[torch.Tensor, ...]:
        """One forward pass over the rows `group` (their (offset, start, end) spans in batch columns) feeding the
        columns from the earliest start to the latest end; each row writes keys/values only inside its own span.
        Returns each row's logits at its `logit_columns()`."""
        length, device = self._cache.layers[0].length, self.model.device
        first, last = min(start for _, start, _ in spans), max(end for _, _, end in spans)
        columns = torch.arange(first, last, device=device)
        embeds, positions, writes, keep = [], [], [], []
        for position, (index, (offset, start, end)) in enumerate(zip(group, spans)):
            decoding = self._rows[index].decoding
            row_embeds, row_positions = decoding.inputs(max(first - offset, 0), last - offset)
            padding = max(offset - first, 0)
            embeds.append(torch.nn.functional.pad(row_embeds, (0, 0, padding, 0)))
            positions.append(torch.nn.functional.pad(row_positions, (padding, 0), value=1))
            writes.append((columns >= start) & (columns < end))
            logit_columns = decoding.logit_columns() + (offset - first)
            keep.append(torch.stack([torch.full_like(logit_columns, position), logit_columns], dim=1))
        offsets = [offset for offset, _, _ in spans]
        attention_mask = None  # without padding, as generate() passes it alone (SDPA may pick its fast kernels)
        if any(offsets):
            starts = torch.tensor(offsets, device=device)[:, None]
            attention_mask = (torch.arange(length, device=device)[None] >= starts).long()
        contiguous = group == list(range(group[0], group[-1] + 1))
        rows = slice(group[0], group[-1] + 1) if contiguous else torch.tensor(group, device=device)
        self._cache.set_step(rows, first, torch.stack(writes))
        logits = self.model(
            inputs_embeds=torch.cat(embeds), attention_mask=attention_mask, position_ids=torch.cat(positions, dim=1),
            cache=self._cache, logits_to_keep=torch.cat(keep),
        ).logits
        self.forward_passes += 1
        return logits.split([len(pairs) for pairs in keep])

    def _commit(self, logits: list[torch.Tensor]) -> None:
        """Each row commits from its own logits by its own settings; finished and failed rows leave. Rows whose
        selection rule is the same this step (`shared_rule_key`) run it as one batch, the others each with its own
        random stream."""
        leaving = []
        for group in shared_rule_groups([(row, row_logits) for row, row_logits in zip(self._rows, logits)
                                         if not row.request.future.cancelled()]):  # cancelled: dropped next step
            canvases = None
            if len(group) > 1:
                try:
                    canvases = commit_together([row.decoding for row, _ in group], [logit for _, logit in group])
                except Exception:  # each row's own rule below then fails only the row whose inputs caused it
                    canvases = None
            for index, (row, row_logits) in enumerate(group):
                try:
                    if canvases is None:
                        with row.random_stream():
                            row.decoding.advance(row_logits)
                    else:
                        row.decoding.apply(canvases[index])
                except Exception as error:
                    row.request.fail(error)
                    leaving.append(row)
                    continue
                if row.decoding.done:
                    self._finish(row)
                    leaving.append(row)
        self._remove(leaving)

    def _finish(self, row: ActiveRow) -> None:
        try:
            sequences = row.decoding.finish()
            answer = sequences[0, sequences.shape[1] - (row.decoding.length - row.decoding.prompt_len) :]
        except Exception as error:
            row.request.fail(error)
        else:
            row.request._settle(answer.clone())

    def _remove(self, leaving: list[ActiveRow]) -> None:
        """Free the rows of requests that left; the rest keep their cache, re-aligned to the longest left."""
        if not leaving:
            return
        kept = [index for index, row in enumerate(self._rows) if row not in leaving]
        self._rows = [self._rows[index] for index in kept]
        self._cache.rearrange(kept, 0, max((row.decoding.length for row in self._rows), default=0))


def shared_rule_groups(rows: list[tuple[ActiveRow, torch.Tensor]]) -> list[list[tuple[ActiveRow, torch.Tensor]]]:
    """The rows grouped by their step's `shared_rule_key`, in row order; a row whose rule must run alone is a group
    of its own."""
    groups: dict[Any, list] = {}
    for position, (row, row_logits) in enumerate(rows):
        key = shared_rule_key(row)
        groups.setdefault(position if key is None else key, []).append((row, row_logits))
    return list(groups.values())


def shared_rule_key(row: ActiveRow) -> tuple | None:
    """The row's selection rule at this step as a key: rows with equal keys may run it as one batch
    (`commit_together`) and commit exactly what each commits alone, because every operation of the rule is then
    row by row. None when the rule must run alone: it draws random numbers (sampling, `alg_temp`, the `origin`
    algorithms), which come from the request's own stream, or reads per-request state (repetition penalty,
    `min_new_tokens`) or keeps per-step scores, or the decoding (a remote-code twin of an older release) cannot take
    a committed canvas."""
    decoding = row.decoding
    config = decoding.plan.config
    if (config.temperature > 0 or config.alg_temp or config.alg in ("origin", "origin-ratio")
            or config.repetition_penalty not in (None, 1.0) or config.min_new_tokens or config.output_scores
            or not hasattr(decoding, "apply")):
        return None
    if row.rule is None:  # the ban list is read from the device once per request, here
        row.rule = (
            config.decoding_pipeline, config.alg, config.alg_p_threshold, config.top_p, config.top_k,
            config.use_original_confidence, config.eps, tuple(decoding.plan.banned.nonzero().flatten().tolist()),
            decoding.masked.device,
        )
    return row.rule, decoding.plan.answer_len, decoding.plan.block_steps, decoding.step


def commit_together(decodings: list[Any], logits: list[torch.Tensor]) -> list[torch.LongTensor]:
    """Phase 4 of `generate()` once for several requests with equal `shared_rule_key`s instead of once each: their
    masks, canvases and logits stacked as one batch through the model's own `_commit_step`. Returns each request's
    committed canvas (1, answer_len) for its `apply`; a step with NaN/inf logits is counted for the requests whose
    rows hold them. Nothing is changed when it raises."""
    first, device = decodings[0], decodings[0].masked.device
    counts = [decoding.coords.shape[0] for decoding in decodings]
    owners = torch.repeat_interleave(  # the output size given: no device sync to learn it
        torch.arange(len(decodings), device=device), torch.tensor(counts, device=device), output_size=sum(counts)
    )
    coords = torch.stack([owners, torch.cat([decoding.coords[:, 1] for decoding in decodings])], dim=1)
    logits = torch.cat(logits)
    sums = logits.sum(dim=-1, dtype=torch.float32)
    bad_rows = (sums.isnan() | (sums == float("inf"))).long()
    nonfinite = torch.zeros(len(decodings), dtype=torch.long, device=device).index_add_(0, owners, bad_rows) > 0
    plan = replace(first.plan, sequences=torch.cat([decoding.plan.canvas for decoding in decodings]), prompt_len=0)
    canvas = first.model._commit_step(
        plan, first.step, torch.cat([decoding.masked for decoding in decodings]), coords, logits,
        torch.cat([decoding.block_masks_at_start for decoding in decodings]),
        SimpleNamespace(nonfinite_steps=0, scores=[]),  # the group's count is attributed per request above
    )
    for index, decoding in enumerate(decodings):
        decoding.record.nonfinite_steps += nonfinite[index]
    return list(canvas.split(1))


def batch_span(decoding: Any, length: int) -> tuple[int, int, int]:
    """A row's left padding in a batch right-aligned to `length` columns, and its step's window in batch columns."""
    offset = length - decoding.length
    start, end = decoding.window()
    return offset, offset + start, offset + end


def encode_images_together(model: Any, requests: list[EngineRequest]) -> None:
    """One vision-tower call for the pictures of every request joining at this step, instead of one call each (on a
    small model, the tower's per-call overhead is a large part of preparing a request). Each request then carries
    its prompt embeddings with its image features merged, as `generate()` builds them from its pixels; a request
    whose image inputs do not look like the processor's keeps its pixels, so its own preparation names the problem.
    """
    chosen = [request for request in requests if has_processor_images(request.arguments)]
    if len(chosen) < 2 or len({request.arguments["pixel_values"].dtype for request in chosen}) > 1:
        return
    try:
        features = model.get_image_features(
            torch.cat([request.arguments["pixel_values"] for request in chosen]),
            torch.cat([request.arguments["image_grid_thw"] for request in chosen]),
        ).pooler_output
    except Exception:  # each request's own preparation reports what is wrong with its pictures
        return
    images = iter(features)
    for request in chosen:
        rows = torch.cat([next(images) for _ in range(request.arguments["image_grid_thw"].shape[0])])
        input_ids = request.arguments["input_ids"].to(model.device)
        is_image = input_ids == model.config.image_token_id
        in_vocabulary = 0 <= int(input_ids.min()) and int(input_ids.max()) < model.config.vocab_size
        if int(is_image.sum()) != rows.shape[0] or not in_vocabulary:
            continue  # its own preparation names the problem
        embeds = model.get_input_embeddings()(input_ids)
        embeds = embeds.masked_scatter(is_image[..., None], rows.to(embeds.device, embeds.dtype))
        request.arguments.pop("pixel_values")
        request.arguments.update(input_ids=input_ids, inputs_embeds=embeds)


def has_processor_images(arguments: dict[str, Any]) -> bool:
    """Pixels, grid and ids shaped as the processor returns them for one prompt (and no embeddings of its own)."""
    pixels, grid, ids = (arguments.get(name) for name in ("pixel_values", "image_grid_thw", "input_ids"))
    if not all(isinstance(value, torch.Tensor) for value in (pixels, grid, ids)) or "inputs_embeds" in arguments:
        return False
    return (pixels.is_floating_point() and pixels.ndim == 2 and not grid.is_floating_point() and grid.ndim == 2
            and grid.shape[-1] == 3 and pixels.shape[0] == int(grid.prod(dim=-1).sum()) and ids.ndim == 2
            and not ids.is_floating_point())


def checked_request_arguments(inputs: Mapping[str, Any], generation_config: Any, settings: dict[str, Any]) -> dict:
    """One request's arguments for `start_decoding`; refuses at once what can never work in the engine."""
    if not isinstance(inputs, Mapping):
        raise TypeError(
            f"submit() takes the processor's output for one prompt (a mapping with input_ids, attention_mask, ...), "
            f"got {type(inputs).__name__}."
        )
    asked = [name for name in OUTPUT_SETTINGS if settings.get(name)]
    if asked:
        raise ValueError(f"{asked} ask for generate()'s full output; the engine returns answer ids. Use generate().")
    both = sorted(set(inputs) & set(settings))
    if both:
        raise TypeError(f"{both} given both in inputs and as settings; pass each once.")
    for name in ("input_ids", "inputs_embeds"):
        value = inputs.get(name)
        if isinstance(value, torch.Tensor) and (value.ndim < 2 or value.shape[0] != 1):
            raise ValueError(
                f"submit() takes one prompt, got {name} of shape {tuple(value.shape)}; submit each prompt of a batch "
                "on its own (or use generate_batch)."
            )
    return {**inputs, **settings, "generation_config": generation_config}


def generate_batch(
    model: Any, inputs: list[Mapping[str, Any]], generation_config: Any = None, progress_bar: bool = True,
    max_batch_size: int = 8, memory_budget: int | None = None, **settings,
) -> list[torch.LongTensor]:
    """Offline bulk decoding (`model.generate_batch`): every processor output in `inputs` (one prompt each) decoded
    by a `DiffusionEngine`, answers (1-D ids after the prompt) in input order; a progress bar counts them."""
    with DiffusionEngine(model, max_batch_size=max_batch_size, memory_budget=memory_budget) as engine:
        return engine.generate_batch(inputs, progress_bar=progress_bar, generation_config=generation_config, **settings)
