"""The batching engine (`dimple.engine`): requests decoded together, one forward pass per step, give the answers they
give alone with `generate()`; waiting requests are served in order, cancelled ones free their row, a failing request
fails alone, and the engine shuts down cleanly."""

import threading
import time
from concurrent.futures import CancelledError

import pytest
import torch
from transformers import TextIteratorStreamer

from prompts import encode, picture

from dimple.engine import (
    DiffusionEngine,
    EngineRequest,
    checked_request_arguments,
    encode_images_together,
    generate_batch,
)

# Mixed prompts (text, one or two pictures) and settings, one request each.
PROMPTS = [
    ("What colour is the car in the image?", [picture(84, 56, 1)]),
    "Hi.",
    ("Compare the two pictures please.", [picture(56, 56, 2), picture(112, 56, 3)]),
    "Tell me a long story about a cat that lived on a boat.",
    ("Describe it.", [picture(56, 84, 4)]),
    "Name three colours.",
]
SETTINGS = [
    dict(max_new_tokens=12, alg_p_threshold=0.3),
    dict(max_new_tokens=5, alg="entropy", steps=3),
    dict(max_new_tokens=16, alg="topk_margin", alg_p_threshold=None, steps=8),
    dict(max_new_tokens=9, decoding_pipeline="dream", steps=4, use_cache=False),
    dict(max_new_tokens=10, block_length=4, alg_p_threshold=0.3),
    dict(max_new_tokens=7, alg="autoregressive", alg_p_threshold=None),
    dict(max_new_tokens=11, temperature=0.8, top_p=0.9, seed=3),
    dict(max_new_tokens=6, alg="origin", alg_p_threshold=None, temperature=0.5, seed=11),
]


def solo_answer(model, inputs, settings) -> tuple[torch.LongTensor, int]:
    """The request decoded alone with generate() (after torch.manual_seed(seed) when it samples): answer, passes."""
    settings = dict(settings)
    seed = settings.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(**inputs, **settings, return_dict_in_generate=True)
    return out.sequences[0, inputs["input_ids"].shape[1] :], out.num_forward_passes


@pytest.fixture(scope="module")
def requests(model, processor) -> list[tuple[dict, dict, torch.LongTensor, int]]:
    """(inputs, settings, solo answer, solo forward passes) for every prompt x settings pair used below."""
    cases = []
    for index, settings in enumerate(SETTINGS):
        inputs = encode(processor, [PROMPTS[index % len(PROMPTS)]])
        cases.append((inputs, settings, *solo_answer(model, inputs, settings)))
    return cases


def test_answers_under_load_equal_solo_answers_with_requests_joining_mid_flight(model, processor, requests):
    first_inputs = encode(processor, [PROMPTS[3]])
    first_settings = dict(max_new_tokens=40, alg_p_threshold=None, steps=40)
    first_solo, first_passes = solo_answer(model, first_inputs, first_settings)
    with DiffusionEngine(model, max_batch_size=4) as engine:
        first = engine.submit(first_inputs, **first_settings)
        while engine.forward_passes < 2:
            time.sleep(0.01)
        assert not first.done()
        handles = [engine.submit(inputs, **settings) for inputs, settings, _, _ in requests]
        answers = [handle.result(timeout=300) for handle in handles]
        assert torch.equal(first.result(timeout=300), first_solo)
    for answer, (_, settings, solo, _) in zip(answers, requests):
        assert torch.equal(answer, solo), settings
    # Batched for real: fewer passes than the requests took one by one.
    assert engine.forward_passes < first_passes + sum(passes for *_, passes in requests)


def test_a_joining_request_does_not_widen_the_passes_of_the_rows_in_flight(model, processor):
    """A request's first pass reads its whole sequence; rows past theirs keep recomputing only their block's window
    (fed together, every row would recompute its whole prompt at each arrival). Answers stay the solo answers."""
    long_inputs = encode(processor, [PROMPTS[3]])
    long_settings = dict(max_new_tokens=24, alg_p_threshold=None, steps=24)
    joining = [(encode(processor, [PROMPTS[index]]), dict(max_new_tokens=8)) for index in (0, 5)]
    widths: list[tuple[int, int]] = []  # (rows, columns) fed by each forward pass
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True
    )
    try:
        with DiffusionEngine(model, max_batch_size=4) as engine:
            first = engine.submit(long_inputs, **long_settings)
            while engine.forward_passes < 2:
                time.sleep(0.01)
            handles = [engine.submit(inputs, **settings) for inputs, settings in joining]
            answers = [handle.result(timeout=300) for handle in handles]
            long_answer = first.result(timeout=300)
    finally:
        hook.remove()
    assert torch.equal(long_answer, solo_answer(model, long_inputs, long_settings)[0])
    for answer, (inputs, settings) in zip(answers, joining):
        assert torch.equal(answer, solo_answer(model, inputs, settings)[0])
    long_length = long_inputs["input_ids"].shape[1] + 24
    joining_lengths = {inputs["input_ids"].shape[1] + 8 for inputs, _ in joining}
    assert widths[0] == (1, long_length)
    # After its first pass, the long request (one block of 24) is fed its window: the block and the column before.
    assert widths[1] == (1, 25)
    full_passes = [(rows, columns) for rows, columns in widths[2:] if columns > 25]
    assert full_passes and all(columns in joining_lengths for _, columns in full_passes)
    assert sum(rows for rows, _ in full_passes) == len(joining)


def test_rows_with_the_same_rule_share_one_selection_pass_and_keep_their_solo_answers(model, processor, monkeypatch):
    """Greedy rows whose rule and schedule agree run the selection rule as one batch (one `_commit_step` call per
    step for all of them); rows that sample (their own random streams) or use other settings run it alone. Every
    answer is still the solo one."""
    shared = dict(max_new_tokens=10, alg_p_threshold=None, steps=5)
    cases = [(encode(processor, [PROMPTS[index]]), shared) for index in range(4)]
    cases += [(encode(processor, [PROMPTS[4]]), dict(max_new_tokens=10, temperature=0.7, steps=5, seed=5)),
              (encode(processor, [PROMPTS[5]]), dict(max_new_tokens=10, alg="entropy", steps=5))]
    solos = [solo_answer(model, inputs, settings)[0] for inputs, settings in cases]
    rule_batches: list[int] = []  # rows of each selection-rule call
    commit_step = type(model)._commit_step

    def counted(self, plan, step, masked, *args):
        rule_batches.append(masked.shape[0])
        return commit_step(self, plan, step, masked, *args)

    monkeypatch.setattr(type(model), "_commit_step", counted)
    with DiffusionEngine(model, max_batch_size=8) as engine:
        with engine._lock:  # all six join the same step
            handles = [engine.submit(inputs, **settings) for inputs, settings in cases]
        answers = [handle.result(timeout=300) for handle in handles]
    for answer, solo, (_, settings) in zip(answers, solos, cases):
        assert torch.equal(answer, solo), settings
    assert rule_batches.count(4) == 5  # the four shared rows: one call per step, five steps
    assert len(rule_batches) == 5 * 3  # and the sampling row and the entropy row each alone


def test_waiting_requests_are_admitted_in_order_and_none_starves(model, requests):
    """With room for two, a long request submitted behind short ones starts before every later one and finishes."""
    admitted = []

    class AdmissionRecorder:
        def __init__(self, name):
            self.name = name

        def put(self, ids):
            if not any(self.name == seen for seen in admitted):
                admitted.append(self.name)

        def end(self):
            pass

    short_inputs, short_settings = requests[1][0], requests[1][1]
    long_inputs, long_settings = requests[2][0], requests[2][1]
    with DiffusionEngine(model, max_batch_size=2) as engine:
        handles = [engine.submit(short_inputs, streamer=AdmissionRecorder(i), **short_settings) for i in range(4)]
        handles.append(engine.submit(long_inputs, streamer=AdmissionRecorder("long"), **long_settings))
        handles += [engine.submit(short_inputs, streamer=AdmissionRecorder(i), **short_settings) for i in range(4, 9)]
        answers = [handle.result(timeout=300) for handle in handles]
    assert admitted == [0, 1, 2, 3, "long", 4, 5, 6, 7, 8]
    assert torch.equal(answers[4], requests[2][2])
    assert all(torch.equal(answer, requests[1][2]) for index, answer in enumerate(answers) if index != 4)


class DraftCounter:
    """A draft streamer that counts the steps it saw and whether it was ended."""

    def __init__(self):
        self.drafts, self.ended = 0, threading.Event()
        self.first_draft = threading.Event()

    def put(self, ids):
        pass

    def put_draft(self, canvas):
        self.drafts += 1
        self.first_draft.set()

    def end(self):
        self.ended.set()


def test_cancelling_a_running_request_frees_its_row(model, processor, requests):
    long_inputs = encode(processor, [PROMPTS[3]])
    long_settings = dict(max_new_tokens=48, alg_p_threshold=None, steps=48)
    short_inputs, short_settings, short_solo, _ = requests[0]
    counter, waiting_streamer = DraftCounter(), DraftCounter()
    with DiffusionEngine(model, max_batch_size=1) as engine:
        running = engine.submit(long_inputs, streamer=counter, **long_settings)
        cancelled_while_waiting = engine.submit(short_inputs, streamer=waiting_streamer, **short_settings)
        behind = engine.submit(short_inputs, **short_settings)
        assert counter.first_draft.wait(timeout=120)
        assert cancelled_while_waiting.cancel() and running.cancel()
        # With room for one, the request behind runs only once the cancelled one's row is free.
        assert torch.equal(behind.result(timeout=300), short_solo)
    with pytest.raises(CancelledError):
        running.result()
    with pytest.raises(CancelledError):
        cancelled_while_waiting.result()
    assert counter.ended.is_set() and counter.drafts < 48
    assert waiting_streamer.drafts == 0 and waiting_streamer.ended.is_set()
    assert engine.active == 0 and engine.waiting == 0
    assert running.cancel() and not behind.cancel()  # cancelled stays cancelled; a finished answer stays


def test_a_failing_request_does_not_affect_the_others(model, processor, requests):
    class FailingDraftStreamer(DraftCounter):
        def put_draft(self, canvas):
            super().put_draft(canvas)
            if self.drafts == 2:
                raise RuntimeError("the client's streamer broke")

    broken_streamer = FailingDraftStreamer()
    masked_prompt = encode(processor, ["Hi."])
    masked_prompt["input_ids"][0, -3] = model.config.mask_token_id
    cut_pixels = dict(requests[0][0])  # joins with other pictures, whose vision tower call it must not spoil
    cut_pixels["pixel_values"] = cut_pixels["pixel_values"][:-4]
    with DiffusionEngine(model, max_batch_size=8) as engine:
        bad_setting = engine.submit(requests[0][0], alg="nope")
        broken = engine.submit(requests[2][0], streamer=broken_streamer, **requests[2][1])
        bad_prompt = engine.submit(masked_prompt)
        bad_pixels = engine.submit(cut_pixels)
        good = [engine.submit(inputs, **settings) for inputs, settings, _, _ in requests]
        answers = [handle.result(timeout=300) for handle in good]
    with pytest.raises(ValueError, match="alg"):
        bad_setting.result()
    with pytest.raises(RuntimeError, match="streamer broke"):
        broken.result()
    assert broken_streamer.ended.is_set()
    with pytest.raises(ValueError, match="mask token"):
        bad_prompt.result()
    with pytest.raises(ValueError, match="pixel_values has shape"):
        bad_pixels.result()
    for answer, (_, settings, solo, _) in zip(answers, requests):
        assert torch.equal(answer, solo), settings


def test_pictures_of_requests_joining_together_take_one_vision_tower_call(model, requests, monkeypatch):
    calls = []
    vision = model.get_image_features
    monkeypatch.setattr(model, "get_image_features", lambda *args, **kwargs: calls.append(1) or vision(*args, **kwargs))
    with_pictures = [case for case in requests if "pixel_values" in case[0] and "seed" not in case[1]]
    assert len(with_pictures) >= 3
    joining = [EngineRequest(None, checked_request_arguments(inputs, None, settings), None, None)
               for inputs, settings, _, _ in with_pictures]
    encode_images_together(model, joining)
    assert len(calls) == 1 and not any("pixel_values" in request.arguments for request in joining)
    for request, (inputs, _, solo, _) in zip(joining, with_pictures):
        out = model.generate(**request.arguments)
        assert torch.equal(out[0, inputs["input_ids"].shape[1] :], solo)


def test_shutdown_finishes_submitted_requests_then_refuses_new_ones(model, requests):
    inputs, settings, solo, _ = requests[0]
    engine = DiffusionEngine(model, max_batch_size=2)
    handles = [engine.submit(inputs, **settings) for _ in range(3)]
    engine.shutdown(wait=True)
    assert all(torch.equal(handle.result(timeout=0), solo) for handle in handles)
    assert not engine._thread.is_alive()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit(inputs, **settings)
    engine.shutdown()  # twice is fine


def test_shutdown_with_cancel_pending_cancels_everything_and_stops(model, processor):
    inputs = encode(processor, [PROMPTS[3]])
    streamer = DraftCounter()
    engine = DiffusionEngine(model, max_batch_size=1)
    running = engine.submit(inputs, streamer=streamer, max_new_tokens=48, alg_p_threshold=None, steps=48)
    queued = engine.submit(inputs, max_new_tokens=4)
    assert streamer.first_draft.wait(timeout=120)
    engine.shutdown(wait=True, cancel_pending=True)
    assert running.future.cancelled() and queued.future.cancelled()
    assert not engine._thread.is_alive() and streamer.ended.is_set()


def test_leaving_the_context_on_an_error_cancels_pending_requests(model, processor):
    inputs = encode(processor, [PROMPTS[3]])
    with pytest.raises(KeyError):
        with DiffusionEngine(model, max_batch_size=1) as engine:
            handle = engine.submit(inputs, max_new_tokens=48, alg_p_threshold=None, steps=48)
            raise KeyError("the caller failed")
    assert handle.future.cancelled() and not engine._thread.is_alive()


def test_streaming_through_the_engine(model, processor, requests):
    inputs, settings, solo, _ = requests[0]
    text_streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True)
    drafts = DraftCounter()
    with DiffusionEngine(model) as engine:
        streamed = engine.submit(inputs, streamer=text_streamer, **settings)
        drafted = engine.submit(inputs, streamer=drafts, **settings)
        text = "".join(text_streamer)
        assert torch.equal(streamed.result(timeout=300), solo)
        drafted.result(timeout=300)
    expected = processor.post_process_image_text_to_text(solo[None])[0]
    assert text.replace("<|endoftext|>", "").strip() == expected.strip()
    assert drafts.drafts == requests[0][3] and drafts.ended.is_set()


def test_memory_budget_bounds_the_batch_and_refuses_what_never_fits(model, requests):
    config = model.config
    per_position = config.num_hidden_layers * 2 * config.num_key_value_heads * (
        config.hidden_size // config.num_attention_heads
    ) * model.dtype.itemsize
    longest = max(inputs["input_ids"].shape[1] + settings["max_new_tokens"] for inputs, settings, _, _ in requests)
    with DiffusionEngine(model, max_batch_size=8, memory_budget=longest * per_position) as engine:
        handles = [engine.submit(inputs, **settings) for inputs, settings, _, _ in requests]
        answers = [handle.result(timeout=300) for handle in handles]
    assert all(torch.equal(answer, solo) for answer, (_, _, solo, _) in zip(answers, requests))
    assert engine.forward_passes == sum(passes for *_, passes in requests)  # one request at a time
    with DiffusionEngine(model, memory_budget=per_position) as engine:
        with pytest.raises(ValueError, match="memory_budget"):
            engine.submit(requests[0][0], **requests[0][1]).result(timeout=300)


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        (dict(max_batch_size=0), ValueError, "max_batch_size"),
        (dict(max_batch_size=True), ValueError, "max_batch_size"),
        (dict(memory_budget=-5), ValueError, "memory_budget"),
    ],
)
def test_bad_engine_settings_are_refused(model, arguments, error, message):
    with pytest.raises(error, match=message):
        DiffusionEngine(model, **arguments)


def test_a_model_without_the_decoding_seam_is_refused(model):
    with pytest.raises(TypeError, match="start_decoding"):
        DiffusionEngine(model.model)  # the decoder alone: no generate(), no seam


def test_bad_submissions_are_refused_at_once(model, processor, requests):
    inputs = requests[0][0]
    with DiffusionEngine(model) as engine:
        with pytest.raises(ValueError, match="one prompt"):
            engine.submit(encode(processor, ["Hi.", "Hello there."]))
        with pytest.raises(TypeError, match="processor's output"):
            engine.submit(inputs["input_ids"])
        with pytest.raises(ValueError, match="return_dict_in_generate"):
            engine.submit(inputs, return_dict_in_generate=True)
        with pytest.raises(ValueError, match="seed"):
            engine.submit(inputs, seed=-1)
        with pytest.raises(TypeError, match="attention_mask"):
            engine.submit(inputs, attention_mask=inputs["attention_mask"])
        hooked = engine.submit(inputs, generation_logits_hook_func=lambda step, x, logits: logits)
        with pytest.raises(ValueError, match="hook"):
            hooked.result(timeout=300)


def test_generate_batch_returns_answers_in_input_order(model, requests, capsys):
    greedy = [case for case in requests if "seed" not in case[1]]
    inputs = [case[0] for case in greedy]
    answers = model.generate_batch(inputs, max_new_tokens=8, alg_p_threshold=0.3, progress_bar=True)
    solo = [solo_answer(model, one, dict(max_new_tokens=8, alg_p_threshold=0.3))[0] for one in inputs]
    assert all(torch.equal(answer, alone) for answer, alone in zip(answers, solo))
    assert f"{len(inputs)}/{len(inputs)}" in capsys.readouterr().err
    assert generate_batch(model, [], progress_bar=False) == []
