"""Dimple's two training objectives as small functions over (batch, seq) tensors.

Dimple is trained autoregressively first (causal attention, next-token loss) and then as a masked diffusion
model (bidirectional attention; answer tokens replaced by `<|mask|>` with probability t ~ U(eps, 1) and
predicted back). Both losses use the released logit convention: the output at position i predicts token i + 1,
so a mask at position j is supervised through the logits at j - 1 (exactly where the sampler reads them).
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..generation_config_dimple import check_eps

IGNORE_INDEX = -100



def ar_loss(logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
    """Next-token cross-entropy: logits at i against labels at i + 1, mean over labels that are not -100.

    The same loss `DimpleModel.forward(labels=...)` returns; written out here so the two objectives can be
    compared term by term.
    """
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(shifted_logits, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def sample_times(
    batch_size: int, eps: float = 1e-3, generator: torch.Generator | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """One diffusion time per sample, t ~ U(eps, 1); eps > 0 keeps every sample's masking rate positive."""
    check_eps(eps)
    return eps + (1.0 - eps) * torch.rand(batch_size, generator=generator, device=device)


def _check_answer_grid(answer_mask: torch.Tensor, t: torch.Tensor) -> None:
    if answer_mask.dtype != torch.bool or answer_mask.ndim != 2:
        raise TypeError("answer_mask must be a bool tensor of shape (batch, seq): True on answer tokens and pads.")
    if t.shape != answer_mask.shape[:1]:
        raise ValueError(f"t needs one time per row: shape ({answer_mask.shape[0]},), got {tuple(t.shape)}.")


def diffusion_mask(
    answer_mask: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Which positions to replace by `<|mask|>`: each answer position independently with its row's probability t.

    Prompt positions (False in `answer_mask`) are never masked: the model always sees the full question.
    """
    _check_answer_grid(answer_mask, t)
    draws = torch.rand(answer_mask.shape, generator=generator, device=answer_mask.device)
    return answer_mask & (draws < t[:, None])


def complementary_masks(
    answer_mask: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two masks with the same t that split the answer: {u < t} and {u >= t}.

    Training on both copies supervises every answer token exactly once per sample, which lowers the variance of
    the diffusion loss at the cost of a doubled batch.
    """
    first = diffusion_mask(answer_mask, t, generator)
    return first, answer_mask & ~first


def predicting_positions(supervised: torch.Tensor) -> torch.Tensor:
    """Where the logits that predict the `supervised` positions sit: position j is predicted at j - 1.

    A bool (batch, seq) tensor for `forward(logits_to_keep=...)`: the model then runs its LM head on these rows
    only, in row-major order, which is also the order of `targets[supervised]`.
    """
    if bool(supervised[:, 0].any()):
        raise ValueError(
            "Position 0 is masked, but no logit predicts it; the prompt must come first and stay unmasked."
        )
    keep = torch.zeros_like(supervised)
    keep[:, :-1] = supervised[:, 1:]
    return keep


def masked_token_loss(
    row_logits: torch.Tensor,
    targets: torch.LongTensor,
    masked: torch.Tensor,
    t: torch.Tensor | None = None,
    time_weighting: bool = False,
) -> torch.Tensor:
    """The diffusion loss from the logits of the predicting rows only, `(masked.sum(), vocab)`.

    `row_logits` are the LM head's outputs at `predicting_positions(masked)` (row-major), so no
    (batch, seq, vocab) tensor is ever built: at 7B scale (152k vocabulary) the full logits of a batch of 8 x 2k
    tokens take about 5 GB in bf16, plus as much again for their gradient. Mean over the masked tokens; with
    `time_weighting` each term is divided by its row's t. No masked token gives a zero loss that still
    backpropagates.
    """
    if masked.shape != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} and masked {tuple(masked.shape)} must share (batch, seq).")
    if row_logits.ndim != 2 or row_logits.shape[0] != int(masked.sum()):
        raise ValueError(
            f"row_logits must be (number of masked positions = {int(masked.sum())}, vocab), got "
            f"{tuple(row_logits.shape)}; pass logits_to_keep=predicting_positions(masked) to the model."
        )
    if row_logits.shape[0] == 0:
        return row_logits.sum() * 0.0
    per_token = F.cross_entropy(row_logits.float(), targets[masked], reduction="none")
    if time_weighting:
        if t is None:
            raise ValueError("time_weighting=True needs the per-row times t used to build the mask.")
        per_token = per_token / t[:, None].expand_as(masked)[masked]
    return per_token.mean()


def diffusion_loss(
    logits: torch.Tensor,
    targets: torch.LongTensor,
    masked: torch.Tensor,
    t: torch.Tensor | None = None,
    time_weighting: bool = False,
) -> torch.Tensor:
    """Cross-entropy of the shifted full logits on masked positions only, mean over the masked tokens of the batch.

    `targets` are the clean ids; position j (masked) is predicted by `logits[:, j - 1]`. With `time_weighting`
    each token's term is multiplied by 1 / t of its row (the ELBO weight of the paper; the released trainer used
    weight 1). Training uses `masked_token_loss`, which needs only the predicting rows' logits; this form takes
    (batch, seq, vocab) logits, e.g. from a model that cannot cut them.
    """
    if masked.shape != targets.shape or logits.shape[:2] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape[:2])}, targets {tuple(targets.shape)} and masked {tuple(masked.shape)} "
            "must share (batch, seq)."
        )
    rows = logits[predicting_positions(masked)]
    return masked_token_loss(rows, targets, masked, t, time_weighting)


def apply_mask(input_ids: torch.LongTensor, masked: torch.Tensor, mask_token_id: int) -> torch.LongTensor:
    """The noisy sequence the model sees: `<|mask|>` wherever `masked` is True."""
    return input_ids.masked_fill(masked, mask_token_id)


def duplicate_batch(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Stack a batch on itself (rows, then images in the same order) for complementary masking."""
    doubled = {}
    for key, value in inputs.items():
        doubled[key] = torch.cat([value, value], dim=0) if isinstance(value, torch.Tensor) else value
    return doubled


def diffusion_objective(
    model: nn.Module,
    inputs: Mapping[str, Any],
    mask_token_id: int,
    eps: float = 1e-3,
    complementary: bool = False,
    time_weighting: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, Any]:
    """Noise a collated batch, run the (bidirectional) model on it and return (loss, outputs).

    `inputs` is what `DimpleSFTCollator` returns; `labels != -100` marks the answer (tokens and pads), the only
    positions that get masked. The LM head runs on the rows that predict masked tokens only. Positions (M-RoPE) are
    computed by the model from the noisy ids, which give the same ids as the clean sequence: only image tokens move
    positions and those are never masked.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels", None)
    if labels is None:
        raise ValueError("The diffusion objective needs `labels` (answer ids, -100 elsewhere), as the collator gives.")
    if complementary:
        inputs, labels = duplicate_batch(inputs), torch.cat([labels, labels], dim=0)
    clean = inputs["input_ids"]
    answer = labels != IGNORE_INDEX
    half = clean.shape[0] // 2 if complementary else clean.shape[0]
    t = sample_times(half, eps, generator, device=clean.device)
    if complementary:
        first, second = complementary_masks(answer[:half], t, generator)
        masked, t = torch.cat([first, second]), torch.cat([t, t])
    else:
        masked = diffusion_mask(answer, t, generator)
    inputs["input_ids"] = apply_mask(clean, masked, mask_token_id)
    outputs = model(**inputs, logits_to_keep=predicting_positions(masked))
    loss = masked_token_loss(outputs.logits, clean, masked, t, time_weighting)
    return loss, outputs


def ar_objective(model: nn.Module, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, Any]:
    """Next-token loss of a collated batch from the labelled rows' logits only (the value `forward(labels=...)`
    gives, without its (batch, seq, vocab) logits): mean cross-entropy over the labels that are not -100."""
    inputs = dict(inputs)
    labels = inputs.pop("labels", None)
    if labels is None:
        raise ValueError(
            "The autoregressive objective needs `labels` (answer ids, -100 elsewhere), as the collator gives."
        )
    labelled = labels != IGNORE_INDEX
    labelled[:, 0] = False  # nothing predicts the first token
    outputs = model(**inputs, logits_to_keep=predicting_positions(labelled))
    return masked_token_loss(outputs.logits, labels, labelled), outputs
