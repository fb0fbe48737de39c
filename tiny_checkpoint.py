"""Tiny random Dimples for tests: same architecture and key layout as Dimple-7B, a few hundred thousand random
parameters, the tiny tokenizer and processor. Built deterministically (`build_tiny_model`); written to a folder by
`python -m dimple.tiny_checkpoint FOLDER`.

The checkpoint bundled with the package (`BUNDLED_CHECKPOINT`, used by the CLI and README) is a trained one,
made by `python -m dimple.train_tiny`.
"""

import sys
from pathlib import Path

import torch

from .configuration_dimple import DimpleConfig
from .modeling_dimple import DimpleModel
from .processing_dimple import DimpleProcessor
from .tiny import build_tiny_processor, special_token_ids

BUNDLED_CHECKPOINT = Path(__file__).resolve().parent / "tiny_checkpoint"


def tiny_config(processor: DimpleProcessor, **overrides) -> DimpleConfig:
    """A 2-layer, 64-wide Dimple whose special-token ids are the tiny tokenizer's."""
    values = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        mrope_section=[2, 3, 3],
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48, window_size=56,
            fullatt_block_indexes=[1],
        ),
        **special_token_ids(processor.tokenizer),
    )
    values.update(overrides)
    return DimpleConfig(**values)


def build_tiny_model(processor: DimpleProcessor, seed: int = 0, **overrides) -> DimpleModel:
    """Random weights from a fixed seed; a peaked LM head so confidences spread like a trained model's."""
    torch.manual_seed(seed)
    model = DimpleModel(tiny_config(processor, **overrides))
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 4.0 / model.config.hidden_size**0.5)
    return model.eval()


def save_tiny_checkpoint(folder: Path) -> Path:
    """Write the random tiny model and processor to `folder` (not the bundled, trained checkpoint)."""
    folder = Path(folder)
    if folder.resolve() == BUNDLED_CHECKPOINT:
        raise ValueError(
            "The bundled checkpoint is the trained tiny Dimple; rebuild it with `python -m dimple.train_tiny`, "
            "or write the random tiny model to another folder."
        )
    processor = build_tiny_processor()
    build_tiny_model(processor).save_pretrained(folder)
    processor.save_pretrained(folder)
    # The package's own modules serve this folder (importing dimple registers them); copies would go stale.
    for module in folder.glob("*.py"):
        module.unlink()
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write("usage: python -m dimple.tiny_checkpoint FOLDER\n")
        sys.exit(2)
    sys.stdout.write(f"{save_tiny_checkpoint(Path(sys.argv[1]))}\n")
