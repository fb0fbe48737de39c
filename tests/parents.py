"""Tiny parents of a Dimple, built from transformers' own classes and written the way the released parents are.

* A Dream decoder: transformers' `Qwen2ForCausalLM` (Dream-7B is a Qwen2.5 architecture) saved with the config.json
  Dream-v0-Instruct-7B ships (model_type "Dream", `mask_token_id`, `rope_theta`, an auto_map to Dream's code), the
  tiny Qwen2-style tokenizer whose tokenizer_config.json names Dream's tokenizer class, and "remote code" files that
  fail on import: assembling must never run a parent's code.
* A Qwen2.5-VL checkpoint: transformers' `Qwen2_5_VLForConditionalGeneration` and its image processor, the tower
  under `visual.*` (what `save_pretrained` writes) or, rewritten, under `model.visual.*`.
* A Qwen2-VL checkpoint, to be refused.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from dimple.tiny.build import build_tiny_tokenizer, special_token_ids

# Qwen2.5-VL-7B-Instruct's preprocessor_config.json layout, with the tiny pixel budget (at most 64 image tokens).
PREPROCESSOR = {
    "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 64, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}
POISON = "raise RuntimeError('a parent checkpoint ran its own code')\n"
DECODER = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=2048)
# The tower's output width (48) differs from the decoder's (64): the projector maps one to the other.
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48, window_size=56,
              fullatt_block_indexes=[1])


def dream_config(ids: dict[str, int]) -> dict:
    """Dream-v0-Instruct-7B's config.json fields, with the tiny sizes."""
    return {
        "architectures": ["DreamModel"], "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "bos_token_id": ids["pad_token_id"], "eos_token_id": ids["eos_token_id"], "hidden_act": "silu",
        "initializer_range": 0.02, "mask_token_id": ids["mask_token_id"], "max_window_layers": 28,
        "model_type": "Dream", "pad_token_id": ids["pad_token_id"], "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "float32",
        "transformers_version": "4.46.2", "use_cache": True, "use_sliding_window": False, **DECODER,
    }


def write_dream(folder: Path, seed: int = 0) -> Path:
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    Qwen2ForCausalLM(Qwen2Config(**DECODER, tie_word_embeddings=False)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(dream_config(special_token_ids(tokenizer)), indent=2))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.update(tokenizer_class="DreamTokenizer",
                            auto_map={"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]})
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    for name in ("configuration_dream.py", "modeling_dream.py", "tokenization_dream.py"):
        (folder / name).write_text(POISON)
    return folder


def drop_mask_token(folder: Path) -> None:
    """The Dream folder's vocabulary without `<|mask|>` (a plain Qwen2 tokenizer)."""
    data = json.loads((folder / "tokenizer.json").read_text())
    data["added_tokens"] = [token for token in data["added_tokens"] if token["content"] != "<|mask|>"]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("mask_token", None)
    config["added_tokens_decoder"] = {
        index: entry
        for index, entry in config.get("added_tokens_decoder", {}).items()
        if entry["content"] != "<|mask|>"
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def vision_ids() -> dict[str, int]:
    ids = special_token_ids(build_tiny_tokenizer())
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return {key: ids[key] for key in names}


def write_qwen25_vl(folder: Path, nested: bool = False, seed: int = 1, **id_overrides) -> Path:
    """A tiny Qwen2.5-VL; `nested=True` rewrites its weights to transformers 5's `model.visual.*` layout."""
    text = dict(vocab_size=512, hidden_size=VISION["out_hidden_size"], intermediate_size=96, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, bos_token_id=480, eos_token_id=480,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 2], "rope_theta": 1e6})
    config = Qwen2_5_VLConfig(text_config=text, vision_config=VISION, **{**vision_ids(), **id_overrides})
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    if nested:
        weights = load_file(folder / "model.safetensors")
        renamed = {("model." + name if name.startswith("visual.") else name): value for name, value in weights.items()}
        save_file(renamed, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def write_qwen2_vl(folder: Path) -> Path:
    text = dict(vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, bos_token_id=480, eos_token_id=480,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 2], "rope_theta": 1e6})
    vision = dict(depth=2, embed_dim=32, hidden_size=48, num_heads=2, mlp_ratio=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **vision_ids())
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    return folder
