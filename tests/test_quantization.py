"""Quantized loading through transformers' quantization backends, on the bundled tiny Dimple.

Each installed backend must load the checkpoint with its quantized layers in place, answer the bundled example picture
as the float32 model does ("two blue circles"), and keep the last position's logits within a tolerance about three
times the deviation measured when the README's table was written. Backends that are not installed are skipped; the
README's 7B weight-memory column is recomputed from the parameter counts of the 7B architecture.
"""

import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from dimple import DimpleConfig, DimpleModel, DimpleProcessor
from dimple.tiny.bundled import BUNDLED_CHECKPOINT

README = Path(__file__).resolve().parents[1] / "README.md"
EXPECTED_ANSWER = "two blue circles"


def bnb(**options) -> Callable:
    def config():
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(**options)

    return config


def torchao_int8_weight_only():
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def quanto(weights: str) -> Callable:
    def config():
        from transformers import QuantoConfig

        return QuantoConfig(weights=weights)

    return config


def is_quantized_layer(module: nn.Module) -> bool:
    """A decoder projection replaced (bitsandbytes, quanto) or given quantized weights (torchao's tensor subclass)."""
    return type(module) is not nn.Linear or type(module.weight) not in (torch.Tensor, nn.Parameter)


# name: (module that must be importable, quantization config factory, logit tolerance)
BACKENDS = {
    "bitsandbytes-8bit": ("bitsandbytes", bnb(load_in_8bit=True), 0.1),
    "bitsandbytes-4bit-nf4": ("bitsandbytes", bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4"), 0.6),
    "bitsandbytes-4bit-fp4": ("bitsandbytes", bnb(load_in_4bit=True, bnb_4bit_quant_type="fp4"), 1.2),
    "torchao-int8-weight-only": ("torchao", torchao_int8_weight_only, 0.15),
    "quanto-int8": ("optimum.quanto", quanto("int8"), 0.15),
    "quanto-int4": ("optimum.quanto", quanto("int4"), 0.6),
}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.fixture(scope="module")
def example_inputs():
    processor = DimpleProcessor.from_pretrained(BUNDLED_CHECKPOINT)
    with Image.open(BUNDLED_CHECKPOINT / "example.png") as image:
        picture = image.convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image", "image": picture},
                                             {"type": "text", "text": "Describe the image."}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return processor, inputs


@pytest.fixture(scope="module")
def float32_logits(example_inputs) -> torch.Tensor:
    _, inputs = example_inputs
    model = DimpleModel.from_pretrained(BUNDLED_CHECKPOINT).eval()
    with torch.no_grad():
        return model(**inputs).logits[0, -1].float()


@pytest.mark.filterwarnings("ignore::UserWarning")  # bitsandbytes: fp32 activations are cast to fp16 for int8 matmul
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_quantized_tiny_model_answers_like_float32(backend, example_inputs, float32_logits):
    module, make_config, tolerance = BACKENDS[backend]
    if not installed(module):
        pytest.skip(f"{module} is not installed (pip install the backend to run this check)")
    processor, inputs = example_inputs
    model = DimpleModel.from_pretrained(BUNDLED_CHECKPOINT, quantization_config=make_config()).eval()
    projections = [model.model.layers[0].self_attn.q_proj, model.model.layers[-1].mlp.down_proj]
    assert all(is_quantized_layer(layer) for layer in projections), [type(layer) for layer in projections]

    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].float()
    delta = float((logits - float32_logits).abs().max())
    assert delta <= tolerance, f"{backend}: max |logit delta| {delta:.3f} > {tolerance}"
    out = model.generate(**inputs)
    assert processor.post_process_image_text_to_text(out[:, inputs["input_ids"].shape[1] :])[0] == EXPECTED_ANSWER


# Bytes per quantized linear weight, and per output row, for the README's 7B column (weights only, bf16 elsewhere).
STORAGE = {
    "bfloat16 (as released)": (2.0, 0),
    "bitsandbytes 8-bit": (1.0, 4),  # int8 + one fp32 scale per row
    "bitsandbytes 4-bit": (0.5 + 4 / 64, 0),  # 4-bit codes + one fp32 absmax per 64 weights
    "torchao int8 weight-only": (1.0, 2),  # int8 + one bf16 scale per row
    "quanto int8": (1.0, 2),  # int8 + one bf16 scale per row
    "quanto int4": (0.5 + 4 / 128, 0),  # 4-bit codes + bf16 scale and shift per group of 128
}


def test_readme_weight_memory_of_the_7b_follows_from_its_parameter_counts():
    from test_model import RELEASED_7B, VISION_DEFAULTS

    config = DimpleConfig(**{**RELEASED_7B, "vision_config": VISION_DEFAULTS})
    with torch.device("meta"):
        model = DimpleModel(config)
    total = sum(parameter.numel() for parameter in model.parameters())
    # transformers' quantizers convert every nn.Linear but the output head (lm_head stays in bf16).
    linears = [module for name, module in model.named_modules() if isinstance(module, nn.Linear) and name != "lm_head"]
    quantized = sum(module.weight.numel() for module in linears)
    rows = sum(module.out_features for module in linears)
    section = README.read_text().split("## Quantization", 1)[1].split("\n## ", 1)[0]
    for backend, (per_weight, per_row) in STORAGE.items():
        gigabytes = (quantized * per_weight + rows * per_row + (total - quantized) * 2) / 1e9
        row = next((line for line in section.splitlines() if line.startswith(f"| {backend} |")), None)
        assert row is not None, f"README's Quantization table has no row for {backend}"
        assert re.search(rf"\| {gigabytes:.1f} GB \|", row), (backend, f"{gigabytes:.2f} GB", row)
