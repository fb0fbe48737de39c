"""Tiny random Dimples for tests: same architecture and key layout as Dimple-7B, a few hundred thousand random
parameters, the tiny tokenizer and processor. Built deterministically (`build_tiny_model`); written to a folder by
`python -m dimple.tiny_checkpoint FOLDER`.

The checkpoint bundled with the package (`BUNDLED_CHECKPOINT`, used by the CLI and README) is a trained one,
made by `python -m dimple.train_tiny`. It is a complete checkpoint: it carries copies of the remote-code modules its
auto_maps name, so `trust_remote_code=True` loads it without the package. `python -m dimple.tiny_checkpoint
--sync-code` refreshes those copies after the package's modules change; a test fails while they differ.
"""

import sys
from pathlib import Path

import torch

from .atomic_write import publish_folder, write_atomically
from .configuration_dimple import DimpleConfig
from .modeling_dimple import DimpleModel
from .processing_dimple import DimpleProcessor
from .remote_code import code_files
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

    def write(staging: Path) -> None:
        build_tiny_model(processor).save_pretrained(staging)
        processor.save_pretrained(staging)
        # The package's own modules serve this folder (importing dimple registers them); copies would go stale.
        for module in staging.glob("*.py"):
            module.unlink()

    return publish_folder(folder, write)


def stale_remote_code(folder: Path = BUNDLED_CHECKPOINT) -> list[str]:
    """Names of the remote-code files `folder` lacks, holds in another version than the package, or holds
    although no auto_map needs them."""
    folder = Path(folder)
    wanted = {path.name: path for path in code_files()}
    present = {path.name for path in folder.glob("*.py")}
    differing = [name for name, source in wanted.items() if name not in present or
                 (folder / name).read_bytes() != source.read_bytes()]
    return sorted(differing + sorted(present - set(wanted)))


def sync_remote_code(folder: Path = BUNDLED_CHECKPOINT) -> list[Path]:
    """Copy the package's remote-code modules into `folder` (and drop any others), so that it loads with
    `trust_remote_code=True` in an interpreter without the package."""
    folder = Path(folder)
    wanted = {path.name: path for path in code_files()}
    for path in folder.glob("*.py"):
        if path.name not in wanted:
            path.unlink()
    for name, source in wanted.items():
        write_atomically(folder / name, source.read_bytes())
    return [folder / name for name in sorted(wanted)]


if __name__ == "__main__":
    if sys.argv[1:] == ["--sync-code"]:
        for written in sync_remote_code():
            sys.stdout.write(f"{written}\n")
    elif len(sys.argv) == 2 and not sys.argv[1].startswith("-"):
        sys.stdout.write(f"{save_tiny_checkpoint(Path(sys.argv[1]))}\n")
    else:
        sys.stderr.write("usage: python -m dimple.tiny_checkpoint FOLDER | --sync-code\n")
        sys.exit(2)
