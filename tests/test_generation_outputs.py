"""What `generate` returns and reports: sequences, per-step history, scores and forward-pass counts, streamed
text and drafts, answers decoded up to the first end-of-text, and a warning when masks are left or logits held
NaN. Mask and vision tokens never reach an answer."""

import pytest
import torch
from transformers import TextIteratorStreamer
from transformers.utils import logging

from dimple.sampling_dimple import answer_lengths
from dimple.tiny.build import build_tiny_model
from prompts import encode


def test_output_reports_history_and_forward_passes(model, processor):
    inputs = encode(processor, ["Count to five."])
    out = model.generate(**inputs, max_new_tokens=8, return_dict_in_generate=True, output_history=True, alg_p_threshold=None)
    assert out.num_forward_passes == len(out.history)
    assert torch.equal(out.history[-1], out.sequences)
    masks = [int((h[:, -8:] == model.config.mask_token_id).sum()) for h in out.history]
    assert masks == sorted(masks, reverse=True) and masks[-1] == 0
    assert float(out.tokens_per_forward[0]) == pytest.approx(8 / out.num_forward_passes)


def test_output_scores_gives_per_step_confidences(model, processor):
    inputs = encode(processor, ["Hello."])
    out = model.generate(**inputs, max_new_tokens=6, output_scores=True, return_dict_in_generate=True,
                         output_history=True, alg_p_threshold=None)
    assert len(out.scores) == out.num_forward_passes == len(out.history)
    assert all(score.shape == (1, 6) for score in out.scores)
    assert torch.isfinite(out.scores[0]).all()  # every slot is masked before the first step
    committed_first = out.history[0][0, -6:] != model.config.mask_token_id
    assert torch.isinf(out.scores[1][0, committed_first]).all()
    with pytest.raises(ValueError, match="output_scores=True needs return_dict_in_generate=True"):
        model.generate(**inputs, output_scores=True)


def test_streamers_receive_final_text_and_every_draft(model, processor):
    inputs = encode(processor, ["Stream this."])
    text_streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True)
    out = model.generate(**inputs, max_new_tokens=8, streamer=text_streamer, alg_p_threshold=None)
    streamed = "".join(text_streamer)
    answer = out[0, inputs["input_ids"].shape[1] :]
    stops = torch.isin(answer, torch.tensor([processor.tokenizer.pad_token_id]))
    cut = int(stops.int().argmax()) if stops.any() else answer.shape[0]
    assert streamed == processor.tokenizer.decode(answer[:cut])

    class Drafts:
        def __init__(self):
            self.drafts = []

        def put_draft(self, value):
            self.drafts.append(value.clone())

        def put(self, value):
            pass

        def end(self):
            pass

    drafts = Drafts()
    out = model.generate(**inputs, max_new_tokens=8, streamer=drafts, return_dict_in_generate=True, output_history=True)
    assert len(drafts.drafts) == out.num_forward_passes
    assert torch.equal(drafts.drafts[-1], out.sequences[:, -8:])


def test_mask_and_vision_tokens_are_never_committed(model, processor):
    inputs = encode(processor, ["Hello."])
    config = model.config
    banned = [config.mask_token_id, config.image_token_id, config.video_token_id, config.vision_start_token_id,
              config.vision_end_token_id, config.vision_token_id]

    def favour_banned(step, x, logits):
        logits = logits.clone()
        logits[..., banned] = logits.max() + 100.0
        return logits

    out = model.generate(**inputs, max_new_tokens=8, generation_logits_hook_func=favour_banned)
    assert not torch.isin(out[0, -8:], torch.tensor(banned)).any()


def test_decoded_answers_stop_at_the_first_end_of_text(processor):
    tokenizer = processor.tokenizer
    end = tokenizer.pad_token_id
    hello, bye = (tokenizer(word, add_special_tokens=False)["input_ids"] for word in ("Hello", " bye"))
    rows = torch.tensor([[end, end] + hello + [end] + bye, hello + bye + [end, end, end]])
    # An answer that starts with end-of-text is empty: answer slices have no left padding.
    assert processor.post_process_image_text_to_text(rows) == ["", "Hello bye"]


def test_masks_left_after_the_last_step_are_reported(model, processor, caplog):
    """alg='autoregressive' with fewer steps than slots leaves masks (as the reference does): say so."""
    inputs = encode(processor, ["Hi."])
    logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            out = model.generate(**inputs, max_new_tokens=8, steps=3, alg="autoregressive", alg_p_threshold=None)
    finally:
        logging.disable_propagation()
    left = int((out == model.config.mask_token_id).sum())
    assert left == 5
    assert "5 <|mask|> token(s) are still in the answer" in caplog.text


def test_nan_logits_are_reported(processor, padded_batch, caplog):
    """A warning, not an error: decoding cannot stop mid-loop without a host sync per step, and the output (other
    rows of a batch may be fine) is still returned for inspection. NaN weights are refused at load instead."""
    broken = build_tiny_model(processor)
    with torch.no_grad():
        broken.model.norm.weight[3] = float("nan")
    logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            broken.generate(**padded_batch, max_new_tokens=6, steps=3, alg_p_threshold=None)
    finally:
        logging.disable_propagation()
    assert "The logits held NaN or inf at 3 of 3 step(s)" in caplog.text


def test_an_answer_that_starts_with_end_of_text_is_empty_everywhere(model, processor):
    """An all-end-of-text answer (as a blank picture can give) decodes to '' in post-processing, the streamer and
    `answer_lengths`, whatever follows the first end-of-text."""
    tokenizer = processor.tokenizer
    end = tokenizer.pad_token_id
    red_tree = tokenizer(" red tree", add_special_tokens=False)["input_ids"]
    rows = torch.tensor([[end] * (len(red_tree) + 3), [end] + red_tree + [end, end]])
    assert processor.post_process_image_text_to_text(rows) == ["", ""]
    assert processor.post_process_image_text_to_text(rows[0]) == [""]
    assert processor.post_process_image_text_to_text(rows[:, :0]) == ["", ""]
    assert answer_lengths(rows, [end]).tolist() == [0, 0]

    inputs = encode(processor, ["Hello."])
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)

    def all_end_of_text(step, x, logits):
        logits = torch.zeros_like(logits)
        logits[..., end] = 5.0
        return logits

    out = model.generate(**inputs, max_new_tokens=6, generation_logits_hook_func=all_end_of_text, streamer=streamer)
    answer = out[:, inputs["input_ids"].shape[1]:]
    assert answer.tolist() == [[end] * 6]
    assert processor.post_process_image_text_to_text(answer) == [""] == ["".join(streamer)]

