"""Property tests of the diffusion sampler on a tiny random model (hypothesis).

For random batches (prompt lengths, left padding, batch size), algorithms, pipelines, thresholds, step counts,
answer lengths and structure priors, `generate` must: decode every mask within `steps`, never change the prompt or
a fixed template token, never leave mask or vision tokens in the answer, and (deterministic modes) give each row
exactly what its prompt gives alone. Examples are derandomized, so a run is reproducible.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dimple.generation_config_dimple import ALGORITHMS, VISION_TOKEN_KEYS
from dimple.tiny.build import DEFAULT_BASE_VOCAB_SIZE, build_tiny_model, build_tiny_processor

DETERMINISTIC = ("maskgit_plus", "topk_margin", "entropy", "autoregressive")
SETTINGS = settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared CPU: threads only contend
    yield build_tiny_model(build_tiny_processor())
    torch.set_num_threads(threads)


text_token = st.integers(min_value=0, max_value=DEFAULT_BASE_VOCAB_SIZE - 1)  # ordinary (non-special) tokens


@st.composite
def decoding_case(draw, deterministic: bool = False):
    """A left-padded prompt batch, an answer (all masks or a template with fixed tokens) and decoding settings."""
    prompts = draw(st.lists(st.lists(text_token, min_size=1, max_size=10), min_size=1, max_size=3))
    answer_len = draw(st.integers(min_value=1, max_value=8))
    template = draw(st.one_of(st.none(), st.lists(st.one_of(st.none(), text_token), min_size=answer_len,
                                                        max_size=answer_len)))
    pipeline = draw(st.sampled_from(["dim", "dream"]))
    algs = DETERMINISTIC if deterministic else [a for a in ALGORITHMS if pipeline == "dim" or a != "origin-ratio"]
    alg = draw(st.sampled_from(algs))
    # A threshold acts only in `dim` and with a probability-like confidence (not entropy); elsewhere it is refused.
    can_threshold = pipeline == "dim" and alg != "entropy"
    threshold = draw(st.one_of(st.none(), st.floats(min_value=0.0, max_value=1.0))) if can_threshold else None
    masks = answer_len if template is None else sum(slot is None for slot in template)
    # `autoregressive` commits one token per step by definition; give it a step per mask unless the threshold's
    # last-step rule ("commit everything left") applies.
    min_steps = masks if alg == "autoregressive" and not threshold else 1
    steps = draw(st.integers(min_value=max(min_steps, 1), max_value=max(min_steps, answer_len + 2)))
    settings = dict(
        steps=steps,
        alg=alg,
        decoding_pipeline=pipeline,
        alg_p_threshold=threshold,
        use_cache=draw(st.booleans()),
    )
    if not deterministic and draw(st.booleans()):
        settings["temperature"] = draw(st.floats(min_value=0.1, max_value=1.5))
    return prompts, answer_len, template, settings


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(prompt) for prompt in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def answer_kwargs(model, answer_len: int, template: list[int | None] | None) -> dict:
    if template is None:
        return {"max_new_tokens": answer_len}
    mask_id = model.config.mask_token_id
    return {"response_template": torch.tensor([mask_id if slot is None else slot for slot in template])}


@SETTINGS
@given(case=decoding_case())
def test_sampler_invariants(model, case):
    prompts, answer_len, template, settings = case
    config = model.config
    ids, mask = left_padded(prompts, config.pad_token_id)
    out = model.generate(
        input_ids=ids, attention_mask=mask, return_dict_in_generate=True, output_history=True,
        **answer_kwargs(model, answer_len, template), **settings,
    )
    prompt_len = ids.shape[1]
    answer = out.sequences[:, prompt_len:]
    assert answer.shape == (len(prompts), answer_len)
    # Every mask is decoded within `steps`; with masks to fill, `dream` runs exactly `steps` passes.
    assert not (answer == config.mask_token_id).any()
    assert out.num_forward_passes <= settings["steps"]
    has_masks = template is None or None in template
    if settings["decoding_pipeline"] == "dream" and has_masks:
        assert out.num_forward_passes == settings["steps"]
    vision = torch.tensor([getattr(config, key) for key in VISION_TOKEN_KEYS])
    assert not torch.isin(answer, vision).any()
    for snapshot in out.history:
        assert torch.equal(snapshot[:, :prompt_len], ids)
        if template is not None:
            fixed = torch.tensor([slot is not None for slot in template])
            expected = torch.tensor([0 if slot is None else slot for slot in template])
            assert torch.equal(snapshot[:, prompt_len:][:, fixed], expected[fixed].expand(len(prompts), -1))


@SETTINGS
@given(case=decoding_case(deterministic=True))
def test_batch_rows_equal_their_solo_runs(model, case):
    prompts, answer_len, template, settings = case
    if len(prompts) == 1:
        prompts = prompts + [prompts[0][:1] + prompts[0]]  # always a padded batch of two or more
    ids, mask = left_padded(prompts, model.config.pad_token_id)
    kwargs = {**answer_kwargs(model, answer_len, template), **settings}
    batch = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    for row, prompt in enumerate(prompts):
        torch.manual_seed(row)  # deterministic modes must not depend on the random state either
        solo = model.generate(input_ids=torch.tensor([prompt]), **kwargs)
        assert torch.equal(batch[row, ids.shape[1] :], solo[0, len(prompt) :]), f"row {row} differs from its solo run"
