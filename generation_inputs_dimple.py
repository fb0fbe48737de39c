"""Checks of what `generate()` is given, before any forward pass: the prompt batch, the answer canvas and the hooks.

Each failure names the problem and the fix, instead of an IndexError deep in the embedding, a shape error inside
attention, or an answer quietly built from padding.
"""

from typing import Any, Callable

import torch
from transformers import PretrainedConfig

from .generation_config_dimple import DEFAULT_MAX_NEW_TOKENS, VISION_TOKEN_KEYS, DimpleGenerationConfig


def check_prompt(
    input_ids: torch.LongTensor | None,
    attention_mask: torch.Tensor | None,
    mask_token_id: int,
    model_config: PretrainedConfig,
    device: torch.device,
) -> tuple[torch.LongTensor, torch.Tensor]:
    """Check the prompt batch and move it to the model's device; generation needs left padding.

    Integer ids of another width are cast to int64; float or bool ids are refused, since a cast could
    silently change them. Without an attention mask, a pad token at either end of a row is refused: it would
    be read as prompt text.
    """
    input_ids = checked_prompt_ids(input_ids, model_config.vocab_size, device)
    pad_id = model_config.pad_token_id
    if attention_mask is None:
        edges = input_ids[:, [0, -1]]
        if pad_id is not None and input_ids.shape[1] > 1 and bool((edges == pad_id).any()):
            raise ValueError(
                f"input_ids start or end with the pad token (id {pad_id}) but no attention_mask was given, so "
                "padding would be read as prompt text; pass the attention_mask the processor returned (or a "
                "mask of ones if those tokens are really part of the prompt)."
            )
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    check_left_padding(attention_mask, input_ids.shape)
    if bool((input_ids == mask_token_id).any()):
        raise ValueError(
            f"The prompt contains the mask token (id {mask_token_id}); masks belong to the answer. Use "
            "`response_template` to give the answer a structure with slots to fill."
        )
    return input_ids, attention_mask


def checked_prompt_ids(input_ids: Any, vocab_size: int, device: torch.device) -> torch.LongTensor:
    """The prompt ids as a (batch, prompt_len) int64 tensor on `device`, every id inside the vocabulary."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            f"generate() needs `input_ids` as a torch.LongTensor, got {type(input_ids).__name__}; call the "
            "processor with return_tensors=\"pt\"."
        )
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(
            f"input_ids must hold integer token ids, got dtype {input_ids.dtype}; pass the processor's "
            "input_ids (torch.long)."
        )
    if input_ids.ndim != 2:
        raise ValueError(
            f"generate() needs `input_ids` of shape (batch, prompt_len), got {tuple(input_ids.shape)}; add a "
            "batch dimension with input_ids[None]."
        )
    if input_ids.shape[1] == 0:
        raise ValueError("The prompt is empty; diffusion decoding needs at least one prompt token.")
    input_ids = input_ids.to(device, torch.long)
    check_token_ids(input_ids, vocab_size, "input_ids")
    return input_ids


def check_left_padding(attention_mask: torch.Tensor, shape: torch.Size) -> None:
    """The answer is appended after the last column, so every row must end there: 0/1 masks, left padding only."""
    if attention_mask.shape != shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(shape)}.")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token), as the processor returns it.")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError(
            "The batch is right-padded; diffusion decoding appends the answer after the last column, so prompts "
            "must be left-padded (the processor pads on the left)."
        )
    if not bool((attention_mask[:, 1:] >= attention_mask[:, :-1]).all()):
        raise ValueError(
            "attention_mask has padding between prompt tokens; only left padding is supported (zeros before the "
            "first token of a row). Re-pad the batch with the processor."
        )


def initial_canvas(
    config: DimpleGenerationConfig,
    template: torch.Tensor | None,
    batch_size: int,
    prompt_len: int,
    model_config: PretrainedConfig,
    device: torch.device,
) -> torch.LongTensor:
    """The answer before decoding: all masks, or the structure-prior template.

    The length is checked against the model's positions before anything is allocated, so an absurd
    `max_new_tokens` fails fast instead of exhausting memory.
    """
    if template is None:
        answer_len = answer_length(config, prompt_len)
        check_total_length(prompt_len, answer_len, model_config.max_position_embeddings)
        return torch.full((batch_size, answer_len), config.mask_token_id, dtype=torch.long, device=device)
    template = checked_template(template, batch_size, device)
    if template.shape[0] != batch_size:
        raise ValueError(
            f"response_template has {template.shape[0]} rows for a batch of {batch_size}; give one row per prompt, "
            "or one row (shape (answer_len,) or (1, answer_len)) for all of them."
        )
    check_total_length(prompt_len, template.shape[1], model_config.max_position_embeddings)
    check_token_ids(template, model_config.vocab_size, "response_template")
    vision_ids = [getattr(model_config, key) for key in VISION_TOKEN_KEYS]
    if bool(torch.isin(template, torch.tensor([i for i in vision_ids if i is not None], device=device)).any()):
        raise ValueError(
            "response_template contains vision tokens (image/video placeholders); a template fixes text only. "
            "Put images in the prompt."
        )
    return template.clone()


def answer_length(config: DimpleGenerationConfig, prompt_len: int) -> int:
    """`max_new_tokens`, else what `max_length` leaves after the prompt, else the default (as in transformers)."""
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    if config.max_length is None:
        return DEFAULT_MAX_NEW_TOKENS
    if config.max_length <= prompt_len:
        raise ValueError(
            f"max_length ({config.max_length}) leaves no room after the {prompt_len}-token prompt; set "
            "max_new_tokens instead."
        )
    return config.max_length - prompt_len


def checked_template(template: Any, batch_size: int, device: torch.device) -> torch.LongTensor:
    """The template as int64 ids, one row per prompt: integer ids of any width are cast (floats and bools, which a
    cast could change, are refused) and a single row serves the whole batch."""
    template = torch.as_tensor(template, device=device)
    if template.is_floating_point() or template.is_complex() or template.dtype == torch.bool:
        raise TypeError(f"response_template must hold integer token ids, got dtype {template.dtype}.")
    if template.ndim not in (1, 2) or template.shape[-1] == 0:
        raise ValueError(
            f"response_template must be token ids of shape (answer_len,) or (batch, answer_len), got "
            f"{tuple(template.shape)}."
        )
    template = template.to(torch.long)
    return template.expand(batch_size, -1) if template.ndim == 1 or template.shape[0] == 1 else template


def check_total_length(prompt_len: int, answer_len: int, max_positions: int) -> None:
    """Prompt and answer share the model's rotary positions."""
    if prompt_len + answer_len > max_positions:
        raise ValueError(
            f"Prompt ({prompt_len}) + answer ({answer_len}) tokens exceed the model's max_position_embeddings "
            f"({max_positions}); shorten the prompt or the answer."
        )


def check_token_ids(ids: torch.Tensor, vocab_size: int, name: str) -> None:
    """Out-of-vocabulary ids would fail deep in the embedding with a bare IndexError (or silently on some GPUs)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"{name} holds ids outside the model's vocabulary [0, {vocab_size}) (min {int(ids.min())}, max "
            f"{int(ids.max())}); encode the text with this checkpoint's own processor/tokenizer."
        )


def checked_logits_hook(hook: Callable | None) -> Callable | None:
    """Wrap a logits hook so that a result of the wrong shape or type fails at once instead of shifting logits."""
    if hook is None:
        return None

    def checked(step: int, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        result = hook(step, x, logits)
        if not isinstance(result, torch.Tensor) or result.shape != logits.shape:
            raise ValueError(
                f"generation_logits_hook_func must return logits of shape {tuple(logits.shape)}, got "
                f"{getattr(result, 'shape', type(result))}; return the (modified) logits it was given."
            )
        return result

    return checked


def checked_hook_tokens(result: torch.Tensor, before: torch.Tensor, answer_len: int) -> torch.Tensor:
    """A tokens hook may rewrite the answer but must keep the shape and leave the prompt alone."""
    if not isinstance(result, torch.Tensor) or result.shape != before.shape:
        raise ValueError(
            f"generation_tokens_hook_func must return a tensor of shape {tuple(before.shape)}, got "
            f"{getattr(result, 'shape', type(result))}."
        )
    if not torch.equal(result[:, :-answer_len], before[:, :-answer_len]):
        raise ValueError("generation_tokens_hook_func changed prompt tokens; it may only change answer positions.")
    return result
