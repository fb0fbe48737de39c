"""Forward parity with the reference implementation on its recorded fixture cases."""

import pytest
import torch
from reference_fixtures import all_sets, forward_cases
from transformers.vision_utils import get_vision_window_index

from dimple import DimpleModel


CASES = forward_cases()
CASE_IDS = [f"{ref.name}-{case['id']}" for ref, case in CASES]


@pytest.fixture(scope="module")
def models():
    loaded = {}

    def load(ref, attn="sdpa"):
        key = (ref.name, str(attn))
        if key not in loaded:
            loaded[key] = DimpleModel.from_pretrained(ref.model_dir, attn_implementation=attn).eval()
        return loaded[key]

    return load


@pytest.mark.parametrize("ref", all_sets(), ids=lambda ref: ref.name)
def test_checkpoint_loads_without_missing_or_unexpected_keys(ref):
    _, info = DimpleModel.from_pretrained(ref.model_dir, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]


@pytest.mark.parametrize(("ref", "case"), CASES, ids=CASE_IDS)
def test_rope_index_matches_reference(ref, case, models):
    model = models(ref)
    ids, mask = ref.tensor(case, "forward.input_ids"), ref.tensor(case, "forward.attention_mask")
    positions, deltas = model._rope_positions(ids, ref.tensor(case, "inputs.image_grid_thw"), mask)
    assert torch.equal(positions, ref.tensor(case, "forward.position_ids"))
    assert torch.equal(deltas, ref.tensor(case, "forward.rope_deltas"))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(("ref", "case"), CASES, ids=CASE_IDS)
def test_logits_match_reference(ref, case, attn, models):
    model = models(ref, attn)
    inputs = ref.inputs(case)
    inputs["input_ids"] = ref.tensor(case, "forward.input_ids")
    inputs["attention_mask"] = ref.tensor(case, "forward.attention_mask")
    with torch.no_grad():
        logits = model(**inputs).logits
    expected = ref.tensor(case, "forward.logits")
    real = inputs["attention_mask"].bool()
    tolerance = max(1e-4, 3 * case["forward"]["float64_model_max_abs_logit_diff"])
    torch.testing.assert_close(logits[real], expected[real], atol=tolerance, rtol=0)


IMAGE_CASES = [(ref, case) for ref, case in CASES if case["image_grid_thw"]]


@pytest.mark.parametrize(("ref", "case"), IMAGE_CASES, ids=[f"{r.name}-{c['id']}" for r, c in IMAGE_CASES])
def test_vision_tower_matches_reference(ref, case, models):
    model = models(ref)
    pixels, grids = ref.tensor(case, "inputs.pixel_values"), ref.tensor(case, "inputs.image_grid_thw")
    vision = model.config.vision_config
    window_index, cu_window = get_vision_window_index(
        grids, spatial_merge_size=vision.spatial_merge_size, window_size=vision.window_size, patch_size=vision.patch_size
    )
    assert torch.equal(window_index.long(), ref.tensor(case, "forward.vision.window_index"))
    assert torch.equal(torch.unique_consecutive(cu_window).int(), ref.tensor(case, "forward.vision.cu_window_seqlens"))

    seen = {}

    def record(block_index):
        def hook(module, args, kwargs):
            seen[block_index] = kwargs["cu_seqlens"]

        return hook

    windowed = next(i for i in range(vision.depth) if i not in vision.fullatt_block_indexes)
    full = vision.fullatt_block_indexes[0]
    handles = [model.visual.blocks[i].register_forward_pre_hook(record(i), with_kwargs=True) for i in (windowed, full)]
    try:
        with torch.no_grad():
            merged = model.visual(pixels, grid_thw=grids).pooler_output
            projected = model.img_projector(merged)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(torch.unique_consecutive(seen[windowed]).int(), ref.tensor(case, "forward.vision.cu_window_seqlens"))
    assert torch.equal(seen[full].int(), ref.tensor(case, "forward.vision.cu_seqlens"))
    torch.testing.assert_close(merged, ref.tensor(case, "forward.vision.merger_output"), atol=1e-5, rtol=0)
    torch.testing.assert_close(projected, ref.tensor(case, "forward.vision.projected"), atol=1e-5, rtol=0)
