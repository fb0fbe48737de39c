"""Training Dimple: objectives, the chat SFT collator, `DimpleTrainer`, LLaVA-format data, the paper's stages and
assembling a new Dimple from its parents (a Dream decoder and a Qwen2.5-VL vision tower).

A local tool, not remote code: none of these modules is copied into a checkpoint.

* `losses`: the autoregressive and diffusion objectives as small functions over (batch, seq) tensors.
* `collator`: `DimpleSFTCollator`, chat samples in the released training format.
* `trainer`: `DimpleTrainer`, `transformers.Trainer` with either objective.
* `llava`: LLaVA / LLaVA-NeXT JSON and JSONL conversations as chat samples.
* `stages`: `dimple train --stage align|ar|diffusion`.
* `assemble`: `dimple assemble --decoder DREAM --vision QWEN_VL --out DIR`.
"""

from .collator import DimpleSFTCollator, padded_answer_length
from .losses import (
    IGNORE_INDEX,
    apply_mask,
    ar_loss,
    ar_objective,
    complementary_masks,
    diffusion_loss,
    diffusion_mask,
    diffusion_objective,
    masked_token_loss,
    predicting_positions,
    sample_times,
)
from .trainer import OBJECTIVES, DimpleTrainer, find_dimple

__all__ = [
    "IGNORE_INDEX",
    "OBJECTIVES",
    "DimpleSFTCollator",
    "DimpleTrainer",
    "apply_mask",
    "ar_loss",
    "ar_objective",
    "complementary_masks",
    "diffusion_loss",
    "diffusion_mask",
    "diffusion_objective",
    "find_dimple",
    "masked_token_loss",
    "padded_answer_length",
    "predicting_positions",
    "sample_times",
]
