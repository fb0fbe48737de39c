"""Diffusion decoding is token-exact with the reference on every recorded deterministic run."""

import pytest
import torch
from reference_fixtures import generation_runs, run_kwargs

from dimple import DimpleModel
from dimple.cache_dimple import prefix_cache


SOLO_RUNS = generation_runs(batch_one=True)
BATCH_RUNS = generation_runs(batch_one=False)


@pytest.fixture(scope="module")
def model_for():
    loaded = {}

    def load(ref):
        if ref.name not in loaded:
            loaded[ref.name] = DimpleModel.from_pretrained(ref.model_dir).eval()
        return loaded[ref.name]

    return load


@pytest.mark.parametrize(
    ("ref", "case", "run"), SOLO_RUNS, ids=[f"{r.name}-{c['id']}-{run['id']}" for r, c, run in SOLO_RUNS]
)
def test_batch_one_run_is_token_exact(ref, case, run, model_for):
    out = model_for(ref).generate(**ref.inputs(case), **run_kwargs(run))
    expected_history = ref.tensors[run["tensors"]["history"]]
    assert len(out.history) == run["steps_executed"]
    assert torch.equal(torch.stack(out.history), expected_history)
    assert torch.equal(out.sequences, ref.tensors[run["tensors"]["sequences"]])


CACHED_RUNS = [(r, c, run) for r, c, run in SOLO_RUNS if run_kwargs(run).get("use_cache")]


@pytest.mark.parametrize(
    ("ref", "case", "run"), CACHED_RUNS, ids=[f"{r.name}-{c['id']}-{run['id']}" for r, c, run in CACHED_RUNS]
)
def test_one_block_covering_the_answer_is_the_reference_cache_mode(ref, case, run, model_for):
    """Block decoding with dual cache degenerates to the reference's prefix cache when one block holds the answer."""
    kwargs = run_kwargs(run)
    answer_len = ref.tensors[run["tensors"]["sequences"]].shape[1] - ref.inputs(case)["input_ids"].shape[1]
    for block_length in (answer_len, answer_len + 7):
        out = model_for(ref).generate(**ref.inputs(case), **{**kwargs, "block_length": block_length})
        assert torch.equal(torch.stack(out.history), ref.tensors[run["tensors"]["history"]])


CACHED_STEP_RUNS = [(r, c, run) for r, c, run in SOLO_RUNS if "step1.logits" in run["tensors"]]


@pytest.mark.parametrize(
    ("ref", "case", "run"), CACHED_STEP_RUNS, ids=[f"{r.name}-{c['id']}" for r, c, run in CACHED_STEP_RUNS]
)
def test_cached_step_sees_the_reference_window(ref, case, run, model_for):
    """Step 1 of a cached run: window ids, M-RoPE ids and logits as recorded."""
    model = model_for(ref)
    seen = {}

    def record(module, args, kwargs):
        if kwargs.get("cache") is not None and kwargs["cache"].get_seq_length() > 0:
            seen.setdefault("position_ids", kwargs["position_ids"])
            seen.setdefault("input_len", kwargs["inputs_embeds"].shape[1])

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = model.generate(**ref.inputs(case), **run_kwargs(run))
    finally:
        handle.remove()
    window_ids = ref.tensors[run["tensors"]["step1.input_ids"]]
    assert seen["input_len"] == window_ids.shape[1]
    assert torch.equal(seen["position_ids"], ref.tensors[run["tensors"]["step1.position_ids"]])
    assert torch.equal(out.history[0][:, -window_ids.shape[1] :], window_ids)



    inputs = ref.inputs(case)
    prompt, answer_len = inputs["input_ids"], window_ids.shape[1] - 1
    full = torch.cat([prompt, torch.full((prompt.shape[0], answer_len), model.config.mask_token_id)], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(prompt.shape[0], answer_len, dtype=torch.long)], dim=1)
    cache = prefix_cache(model.config.num_hidden_layers, prompt.shape[1] - 1)
    with torch.no_grad():
        first = model(input_ids=full, attention_mask=mask, pixel_values=inputs.get("pixel_values"),
                      image_grid_thw=inputs.get("image_grid_thw"), cache=cache)
        step1 = model(input_ids=window_ids, attention_mask=mask, cache=cache, rope_deltas=first.rope_deltas)
    expected = ref.tensors[run["tensors"]["step1.logits"]]
    tolerance = max(1e-4, 3 * case["forward"]["float64_model_max_abs_logit_diff"])
    torch.testing.assert_close(step1.logits, expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize(
    ("ref", "case", "run"), BATCH_RUNS, ids=[f"{r.name}-{c['id']}-{run['id']}" for r, c, run in BATCH_RUNS]
)
def test_batched_rows_equal_their_prompt_alone(ref, case, run, model_for):
    """The reference couples batch rows; ours must not: each row equals its unpadded prompt decoded alone."""
    model = model_for(ref)
    inputs = ref.inputs(case)
    batch = model.generate(**inputs, **run_kwargs(run))
    prompt_len = inputs["input_ids"].shape[1]
    patches_per_image = inputs["image_grid_thw"].prod(dim=1) if "image_grid_thw" in inputs else None
    image_start = 0
    for row in range(inputs["input_ids"].shape[0]):
        real = inputs["attention_mask"][row].bool()
        ids = inputs["input_ids"][row][real][None]
        alone = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        num_images = int((ids == model.config.vision_start_token_id).sum())
        if num_images:
            grids = inputs["image_grid_thw"][image_start : image_start + num_images]
            first_patch = int(patches_per_image[:image_start].sum())
            alone["pixel_values"] = inputs["pixel_values"][first_patch : first_patch + int(grids.prod(dim=1).sum())]
            alone["image_grid_thw"] = grids
            image_start += num_images
        solo = model.generate(**alone, **run_kwargs(run))
        assert torch.equal(batch.sequences[row, prompt_len:], solo.sequences[0, ids.shape[1] :])
