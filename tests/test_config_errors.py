"""Configs and checkpoint files that make no sense are refused at construction or load with one clear error
naming the value: out-of-range or mistyped config values (also when edited after construction), a config without
`vision_config`, a truncated tokenizer file, an unknown attention implementation."""

import pytest

from dimple import DimpleModel
from dimple.tiny.bundled import BUNDLED_CHECKPOINT


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"num_attention_heads": 0}, ValueError, r"config.num_attention_heads must lie in \[1, 1024\], got 0"),
        ({"hidden_size": "64"}, TypeError, r"config.hidden_size must be an integer, got '64' \(str\)"),
        ({"vocab_size": -5}, ValueError, r"config.vocab_size must lie in \[1, 16777216\], got -5"),
        ({"num_hidden_layers": -1}, ValueError, r"config.num_hidden_layers must lie in \[1, 1024\], got -1"),
        ({"num_hidden_layers": 100000}, ValueError, r"num_hidden_layers must lie in \[1, 1024\], got 100000"),
        ({"num_attention_heads": 3}, ValueError, r"hidden_size \(64\) must be divisible by num_attention_heads"),
        ({"intermediate_size": 2**18, "hidden_size": 2**16, "num_attention_heads": 1024, "num_key_value_heads": 8,
          "mrope_section": [8, 12, 12], "num_hidden_layers": 1024}, ValueError, r"about [\d,]+B parameters"),
        ({"vision_config": {"depth": 0}}, ValueError, r"vision_config.depth must lie in \[1, 1024\], got 0"),
        ({"vision_config": {"num_heads": 3}}, ValueError, "vision_config.hidden_size .* divisible by"),
        ({"mask_token_id": 600}, ValueError, r"config.mask_token_id=600 lies outside the vocabulary \[0, 512\)"),
        ({"mask_token_id": -1}, ValueError, r"config.mask_token_id=-1 lies outside the vocabulary"),
        ({"mask_token_id": "<|mask|>"}, TypeError, "config.mask_token_id must be an integer token id"),
        ({"mask_token_id": 480}, ValueError, r"config.mask_token_id \(480\) equals config.pad_token_id"),
        ({"eos_token_id": [480, 488]}, ValueError, r"mask_token_id \(488\) equals config.eos_token_id"),
    ],
)
def test_config_values_that_make_no_sense(processor, overrides, error, message):
    from dimple.tiny.build import tiny_config

    with pytest.raises(error, match=message):
        tiny_config(processor, **overrides)


def test_config_edited_after_construction_is_checked_before_any_module_is_built(processor):
    from dimple.tiny.build import tiny_config

    config = tiny_config(processor)
    config.num_hidden_layers = 100000
    with pytest.raises(ValueError, match="num_hidden_layers must lie in"):
        DimpleModel(config)


def test_config_file_without_vision_config(tmp_path):
    from dimple import DimpleConfig

    (tmp_path / "config.json").write_text('{"model_type": "dimple", "hidden_size": 64}')
    with pytest.raises(ValueError, match="The Dimple config has no vision_config"):
        DimpleConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="The Dimple config has no vision_config"):
        DimpleModel.from_pretrained(tmp_path)


def test_truncated_tokenizer_file_is_named(tmp_path):
    import shutil

    from dimple import DimpleProcessor

    folder = tmp_path / "checkpoint"
    shutil.copytree(BUNDLED_CHECKPOINT, folder)
    data = (folder / "tokenizer.json").read_bytes()
    (folder / "tokenizer.json").write_bytes(data[:4096])
    with pytest.raises(ValueError, match=r"tokenizer.json is not valid JSON .*truncated or corrupt; re-download"):
        DimpleProcessor.from_pretrained(folder)


def test_unknown_attn_implementation():
    with pytest.raises(ValueError, match='attn_implementation="foo"` is not supported'):
        DimpleModel.from_pretrained(BUNDLED_CHECKPOINT, attn_implementation="foo")
