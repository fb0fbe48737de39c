"""`DimpleTrainer`: `transformers.Trainer` with Dimple's autoregressive and diffusion objectives."""

from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..generation_config_dimple import check_eps
from ..modeling_dimple import DimplePreTrainedModel
from .losses import ar_objective, diffusion_objective

OBJECTIVES = ("ar", "diffusion")


def find_dimple(model: nn.Module) -> DimplePreTrainedModel:
    """The Dimple model inside a wrapper (PEFT, DDP, ...), to switch its attention mode."""
    for module in model.modules():
        if isinstance(module, DimplePreTrainedModel):
            return module
    raise TypeError(f"{type(model).__name__} contains no Dimple model; DimpleTrainer trains DimpleModel only.")


class DimpleTrainer(Trainer):
    """`transformers.Trainer` with Dimple's two objectives.

    Args:
        objective: ``"ar"`` (causal attention, next-token loss; the alignment and instruction phases) or
            ``"diffusion"`` (bidirectional attention, masked-token loss; the final phase). The model's attention
            mode is switched accordingly when the trainer is built, and stays so after training.
        complementary_masking: train each sample twice with complementary masks (same t).
        time_weighting: weight the diffusion loss by 1 / t.
        eps: smallest diffusion time.
    All other arguments are `Trainer`'s. ``remove_unused_columns`` is turned off because the collator consumes
    raw chat samples; losses are per-batch means, which the Trainer scales for gradient accumulation.
    """

    def __init__(
        self,
        *args: Any,
        objective: str = "diffusion",
        complementary_masking: bool = False,
        time_weighting: bool = False,
        eps: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"Unknown objective {objective!r}; choose 'ar' or 'diffusion'.")
        check_eps(eps)
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False
        # Per-batch means: the Trainer divides them by the accumulation steps (both spellings across 5.x releases).
        self.loss_is_scaled_for_ga = False
        self.model_accepts_loss_kwargs = False
        self.objective = objective
        self.complementary_masking = complementary_masking
        self.time_weighting = time_weighting
        self.eps = eps
        dimple = find_dimple(self.model)
        dimple.set_attention_mode(causal=objective == "ar")
        self.mask_token_id = dimple.config.mask_token_id

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """AR: `ar_objective` (next-token loss). Diffusion: `diffusion_objective` on a freshly noised batch. Both
        run the LM head on the scored rows only."""
        if self.objective == "ar":
            loss, outputs = ar_objective(model, inputs)
        else:
            loss, outputs = diffusion_objective(
                model, inputs, self.mask_token_id, self.eps, self.complementary_masking, self.time_weighting
            )
        return (loss, outputs) if return_outputs else loss
