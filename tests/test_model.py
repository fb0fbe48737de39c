"""Config reading, the 7B layout, attention backends, dtype handling, bad inputs and remote-code loading."""

import json
import textwrap

import pytest
import torch
from isolated import run_without_dimple
from reference_fixtures import all_sets

from dimple import DimpleConfig, DimpleModel, DimpleVisionConfig


TINY_A = all_sets()[0]
VISION_DEFAULTS = dict(
    depth=32, hidden_size=1280, hidden_act="silu", intermediate_size=3420, num_heads=16, in_channels=3,
    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
    out_hidden_size=3584, fullatt_block_indexes=(7, 15, 23, 31),
)
RELEASED_7B = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, rope_theta=1000000.0, max_position_embeddings=131072, bos_token_id=151643,
    eos_token_id=151643, vision_config={"model_type": "dimple", "in_chans": 3, "spatial_patch_size": 14},
)


@pytest.fixture(scope="module")
def tiny_a():
    return DimpleModel.from_pretrained(TINY_A.model_dir).eval()


def test_vision_defaults_are_the_released_ones():
    vision = DimpleVisionConfig()
    for key, value in VISION_DEFAULTS.items():
        assert getattr(vision, key) == value or tuple(getattr(vision, key)) == value, key


def test_released_config_reads_unchanged_and_round_trips(tmp_path):
    config = DimpleConfig.from_pretrained(TINY_A.model_dir)
    raw = json.loads((TINY_A.model_dir / "config.json").read_text())
    for key in ("mrope_section", "full_attn_mask", "mask_token_id", "image_token_id", "vision_start_token_id"):
        assert getattr(config, key) == raw[key]
    assert config.vision_config.patch_size == 14 and config.vision_config.depth == raw["vision_config"]["depth"]
    config.save_pretrained(tmp_path)
    assert DimpleConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    as_object = DimpleConfig(vision_config=DimpleVisionConfig(**raw["vision_config"]))
    as_dict = DimpleConfig(vision_config=raw["vision_config"])
    assert as_object.vision_config.to_dict() == as_dict.vision_config.to_dict()


def test_invalid_architecture_is_refused():
    with pytest.raises(ValueError, match="mrope_section"):
        DimpleConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, mrope_section=[4, 4, 4])


def test_released_7b_layout_on_meta_device():
    config = DimpleConfig(**RELEASED_7B)
    with torch.device("meta"):
        model = DimpleModel(config)
    keys = set(model.state_dict())
    assert {k.split(".")[0] for k in keys} == {"visual", "img_projector", "model", "lm_head"}
    assert "model.layers.27.self_attn.q_proj.bias" in keys and "model.layers.27.self_attn.o_proj.bias" not in keys
    assert "visual.blocks.31.mlp.gate_proj.bias" in keys and "visual.merger.mlp.2.weight" in keys
    assert model.state_dict()["model.layers.0.self_attn.k_proj.weight"].shape == (512, 3584)
    assert model.state_dict()["img_projector.linear_1.weight"].shape == (3584, 3584)
    assert not any("inv_freq" in key for key in keys)
    assert sum(p.numel() for p in model.parameters()) == 7_615_616_512 + 676_550_144 + 25_697_280


def test_rotary_tables_stay_float32_after_casting(tiny_a):
    model = DimpleModel.from_pretrained(TINY_A.model_dir, dtype=torch.bfloat16)
    model.to(torch.bfloat16)
    tables = {name: buf for name, buf in model.named_buffers() if name.endswith("inv_freq")}
    assert tables and all(buf.dtype == torch.float32 for buf in tables.values())
    reference = dict(tiny_a.named_buffers())
    for name, table in tables.items():
        assert torch.equal(table, reference[name])


def padded_batch(case_ids, ref=TINY_A):
    case = next(c for c in ref.cases["cases"] if c["id"] == case_ids)
    return ref.inputs(case)


@pytest.mark.parametrize("backend", ["eager", {"": "flex_attention", "vision_config": "sdpa"}])
def test_backends_agree_with_sdpa_on_a_left_padded_batch(tiny_a, backend):
    inputs = padded_batch("c6_mixed_b2_leftpad")
    other = DimpleModel.from_pretrained(TINY_A.model_dir, attn_implementation=backend).eval()
    with torch.no_grad():
        expected, got = tiny_a(**inputs).logits, other(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=0)


def test_padded_row_equals_the_same_prompt_unpadded(tiny_a):
    inputs = padded_batch("c5_text_b2_leftpad")
    row = 0
    real = inputs["attention_mask"][row].bool()
    with torch.no_grad():
        batch = tiny_a(**inputs).logits[row][real]
        alone = tiny_a(input_ids=inputs["input_ids"][row][real][None]).logits[0]
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=0)


def test_image_token_count_mismatch_names_both_numbers(tiny_a):
    inputs = padded_batch("c2_image_b1")
    fewer = inputs["image_grid_thw"].clone()
    fewer[0, 1] -= 4
    patches = int(fewer.prod())
    with pytest.raises(ValueError, match=r"holds 24 image tokens but the images give 12 features"):
        tiny_a(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][:patches], image_grid_thw=fewer)


def test_pixel_values_without_grid_are_refused(tiny_a):
    inputs = padded_batch("c2_image_b1")
    with pytest.raises(ValueError, match="image_grid_thw"):
        tiny_a(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])


def test_video_inputs_are_refused_clearly(tiny_a):
    inputs = padded_batch("c1_text_b1")
    with pytest.raises(ValueError, match="video"):
        tiny_a(**inputs, pixel_values_videos=torch.zeros(4, 1176), video_grid_thw=torch.tensor([[2, 2, 2]]))


def test_sdpa_is_the_default_backend(tiny_a):
    assert tiny_a.config._attn_implementation == "sdpa"
    assert tiny_a.config.vision_config._attn_implementation == "sdpa"


def test_unknown_attention_implementation_is_refused():
    with pytest.raises(ValueError, match="foo"):
        DimpleModel.from_pretrained(TINY_A.model_dir, attn_implementation="foo")


def test_remote_code_round_trip_in_a_fresh_process(tiny_a, tmp_path):
    from dimple.tiny.build import build_tiny_processor

    model_dir = tmp_path / "checkpoint"
    tiny_a.save_pretrained(model_dir)
    build_tiny_processor().save_pretrained(model_dir)
    auto_map = json.loads((model_dir / "config.json").read_text())["auto_map"]
    assert set(auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForImageTextToText", "AutoModelForCausalLM"}
    inputs = padded_batch("c3_image_b2_leftpad")
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        torch.save(tiny_a(**inputs).logits, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
        folder = {str(model_dir)!r}
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        task_model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        for obj in (config, model, task_model, processor):
            assert type(obj).__module__.startswith("transformers_modules"), type(obj).__module__
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            logits = model(**inputs).logits
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        real = inputs["attention_mask"].bool()
        torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=0)
        out = model.generate(**inputs, max_new_tokens=4)
        assert out.shape == (2, inputs["input_ids"].shape[1] + 4)
        print("ok")
        """
    )
    result = run_without_dimple(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
