"""Fine-tuning Dimple: the autoregressive and diffusion objectives, a chat SFT collator and a `Trainer`.

Dimple is trained autoregressively first (causal attention, next-token loss) and then as a masked diffusion
model (bidirectional attention; answer tokens replaced by `<|mask|>` with probability t ~ U(eps, 1) and
predicted back). Both losses use the released logit convention: the output at position i predicts token i + 1,
so a mask at position j is supervised through the logits at j - 1 (exactly where the sampler reads them).

Samples follow the released training format (the reference training code's): a system turn, then per user turn
``\\n<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n`` and per assistant turn its text followed
by one or more ``<|endoftext|>`` pads (no ``<|im_end|>``). Labels are the answer tokens and their pads; the
prompt is never masked or supervised.
"""

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import Trainer

from .generation_config_dimple import check_eps
from .modeling_dimple import DimplePreTrainedModel
from .processing_dimple import DEFAULT_SYSTEM_PROMPT

IGNORE_INDEX = -100
OBJECTIVES = ("ar", "diffusion")


# --- Losses and masking: small pure functions over (batch, seq) tensors ------------------------------------


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


def diffusion_loss(
    logits: torch.Tensor,
    targets: torch.LongTensor,
    masked: torch.Tensor,
    t: torch.Tensor | None = None,
    time_weighting: bool = False,
) -> torch.Tensor:
    """Cross-entropy of the shifted logits on masked positions only, mean over the masked tokens of the batch.

    `targets` are the clean ids; position j (masked) is predicted by `logits[:, j - 1]`. With `time_weighting`
    each token's term is multiplied by 1 / t of its row (the ELBO weight of the paper; the released trainer used
    weight 1). A batch with no masked token gives a zero loss that still backpropagates.
    """
    if masked.shape != targets.shape or logits.shape[:2] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape[:2])}, targets {tuple(targets.shape)} and masked {tuple(masked.shape)} "
            "must share (batch, seq)."
        )
    if bool(masked[:, 0].any()):
        raise ValueError("Position 0 is masked, but no logit predicts it; the prompt must come first and stay unmasked.")
    supervised = masked[:, 1:]
    if not bool(supervised.any()):
        return logits.sum() * 0.0
    per_token = F.cross_entropy(logits[:, :-1][supervised].float(), targets[:, 1:][supervised], reduction="none")
    if time_weighting:
        if t is None:
            raise ValueError("time_weighting=True needs the per-row times t used to build the mask.")
        per_token = per_token / t[:, None].expand_as(supervised)[supervised]
    return per_token.mean()


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
    positions that get masked. Positions (M-RoPE) are computed by the model from the noisy ids, which give the
    same ids as the clean sequence: only image tokens move positions and those are never masked.
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
    outputs = model(**inputs)
    loss = diffusion_loss(outputs.logits, clean, masked, t, time_weighting)
    return loss, outputs


# --- Samples: the released chat format with answer padding -------------------------------------------------


def padded_answer_length(answer_len: int, rng: random.Random, upper: int | None = None) -> int:
    """Answer length after `<|endoftext|>` padding: uniform in [n + 1, U], so at least one pad follows.

    The released rule: U = 2^ceil(log2(n + 1)) for n < 16, else 16 * (floor(n / 16) + 1). A fixed `upper`
    replaces U (clamped to at least n + 1) so that every canvas length up to the one used for decoding is seen.
    """
    n = answer_len
    if upper is None:
        upper = 2 ** math.ceil(math.log2(n + 1)) if n < 16 else 16 * (n // 16 + 1)
    return rng.randint(n + 1, max(upper, n + 1))


def _content_items(content: str | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, Sequence) or not all(isinstance(item, Mapping) for item in content):
        raise TypeError("Message content must be a string or a list of {'type': 'text'|'image', ...} dicts.")
    return list(content)


def _is_image_item(item: Mapping[str, Any]) -> bool:
    return item.get("type") == "image" or "image" in item


class DimpleSFTCollator:
    """Turn chat samples into a right-padded training batch: input_ids, attention_mask, labels and images.

    A sample is ``{"messages": [...]}`` with chat-template messages (roles system/user/assistant; content a string
    or a list of ``{"type": "text", "text": ...}`` and ``{"type": "image", "image": PIL.Image}`` items). Each
    assistant turn is followed by ``<|endoftext|>`` pads (`padded_answer_length`); labels are its tokens and pads,
    -100 elsewhere. Images go through the processor's image processor; each becomes
    ``<|vision_start|>`` + one ``<|image_pad|>`` per merged patch + ``<|vision_end|>``.

    Args:
        processor: a `DimpleProcessor`.
        pad_upper: None for the released dynamic padding rule, or a fixed upper bound of the padded answer length
            (e.g. the `max_new_tokens` you decode with).
        seed: seeds the padding lengths, so batches are reproducible.
    """

    def __init__(self, processor: Any, pad_upper: int | None = None, seed: int = 0) -> None:
        if pad_upper is not None and (not isinstance(pad_upper, int) or pad_upper < 2):
            raise ValueError(f"pad_upper must be None or an int >= 2 (answer + one pad), got {pad_upper!r}.")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.pad_upper = pad_upper
        self.rng = random.Random(seed)
        vocab = self.tokenizer.get_vocab()
        self.pad_id = vocab["<|endoftext|>"]
        self.image_pad_id = vocab["<|image_pad|>"]
        self.merge_area = processor.image_processor.merge_size**2

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def sample_tokens(
        self, messages: Sequence[Mapping[str, Any]], image_tokens: list[int]
    ) -> tuple[list[int], list[int], list[Image.Image]]:
        """(input_ids, labels, images) of one conversation; `image_tokens` gives the pad count per image in order."""
        if not messages or not isinstance(messages, Sequence):
            raise ValueError("A sample needs a non-empty 'messages' list of chat turns.")
        system = DEFAULT_SYSTEM_PROMPT
        if messages[0].get("role") == "system":
            system, messages = "".join(i.get("text", "") for i in _content_items(messages[0]["content"])), messages[1:]
        ids = self.encode(f"<|im_start|>system\n{system}<|im_end|>")
        labels = [IGNORE_INDEX] * len(ids)
        images: list[Image.Image] = []
        answered = False
        for message in messages:
            role = message.get("role")
            if role == "user":
                pieces = ["\n<|im_start|>user\n"]
                for item in _content_items(message["content"]):
                    if _is_image_item(item):
                        if not isinstance(item.get("image"), Image.Image):
                            raise TypeError("Image items must hold a PIL.Image under 'image' (load files first).")
                        count = image_tokens[len(images)]
                        images.append(item["image"])
                        pieces.append("<|vision_start|>" + "<|image_pad|>" * count + "<|vision_end|>")
                    else:
                        pieces.append(item.get("text", ""))
                pieces.append("<|im_end|>\n<|im_start|>assistant\n")
                prompt = self.encode("".join(pieces))
                ids += prompt
                labels += [IGNORE_INDEX] * len(prompt)
            elif role == "assistant":
                text = "".join(item.get("text", "") for item in _content_items(message["content"]))
                answer = self.encode(text)
                answer += [self.pad_id] * (padded_answer_length(len(answer), self.rng, self.pad_upper) - len(answer))
                ids += answer
                labels += answer
                answered = True
            else:
                raise ValueError(f"Unknown role {role!r}; use 'system' (first turn only), 'user' or 'assistant'.")
        if not answered:
            raise ValueError("A training sample needs at least one assistant turn to supervise.")
        return ids, labels, images

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        all_images = [
            item["image"]
            for sample in samples
            for message in self._messages(sample)
            if message.get("role") == "user"
            for item in _content_items(message["content"])
            if _is_image_item(item)
        ]
        vision = {}
        counts: list[int] = []
        if all_images:
            vision = self.processor.image_processor(images=all_images, return_tensors="pt")
            counts = (vision["image_grid_thw"].prod(dim=-1) // self.merge_area).tolist()
        rows, used = [], 0
        for sample in samples:
            ids, labels, images = self.sample_tokens(self._messages(sample), counts[used:])
            used += len(images)
            rows.append((ids, labels))
        width = max(len(ids) for ids, _ in rows)
        batch = {
            "input_ids": torch.full((len(rows), width), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
            "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
        }
        for row, (ids, labels) in enumerate(rows):
            batch["input_ids"][row, : len(ids)] = torch.tensor(ids)
            batch["attention_mask"][row, : len(ids)] = 1
            batch["labels"][row, : len(ids)] = torch.tensor(labels)
        if all_images:
            batch["pixel_values"] = vision["pixel_values"]
            batch["image_grid_thw"] = vision["image_grid_thw"]
        return batch

    @staticmethod
    def _messages(sample: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
        if not isinstance(sample, Mapping) or "messages" not in sample:
            raise TypeError("Each sample must be a dict with a 'messages' list (chat-template format).")
        return sample["messages"]


# --- Trainer ------------------------------------------------------------------------------------------------


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
        """AR: the model's own next-token loss. Diffusion: `diffusion_objective` on a freshly noised batch."""
        if self.objective == "ar":
            outputs = model(**inputs)
            loss = outputs.loss
        else:
            loss, outputs = diffusion_objective(
                model, inputs, self.mask_token_id, self.eps, self.complementary_masking, self.time_weighting
            )
        return (loss, outputs) if return_outputs else loss


__all__ = [
    "DimpleSFTCollator",
    "DimpleTrainer",
    "ar_loss",
    "apply_mask",
    "complementary_masks",
    "diffusion_loss",
    "diffusion_mask",
    "diffusion_objective",
    "padded_answer_length",
    "sample_times",
]
