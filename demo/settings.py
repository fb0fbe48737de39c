"""The settings a person can change per message, read from the page's raw field values.

Every value arrives as the browser sent it (a number field may be empty, a text field anything): each is checked
here, and a bad one becomes one `ValueError` naming the field and what it accepts, which the page shows as text.
The decoder checks the rest itself (its `ValueError`s are shown the same way).
"""

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..generation_config_dimple import ALGORITHMS

DEFAULT_ANSWER_LENGTH = 32
MAX_ANSWER_LENGTH = 1024


@dataclass(frozen=True)
class DemoSettings:
    """One message's decoding settings; `template` is the structure prior's text (empty: none)."""

    answer_length: int = DEFAULT_ANSWER_LENGTH
    steps: int | None = None
    threshold: float = 0.95
    algorithm: str = "maskgit_plus"
    temperature: float = 0.0
    top_p: float = 1.0
    use_cache: bool = True
    template: str = ""


def whole_number(label: str, value: Any, low: int, high: int, empty: int | None = None) -> int | None:
    """A whole number in [low, high]; an empty field gives `empty` where that is allowed."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if empty is None and low > 0:
            raise ValueError(f"{label} is empty; enter a whole number from {low} to {high}.")
        return empty
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label} must be a whole number from {low} to {high}, got {value!r}.") from None
    if not number.is_integer() or not low <= number <= high:
        raise ValueError(f"{label} must be a whole number from {low} to {high}, got {number:g}.")
    return int(number)


def number_in(label: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    """A finite number in [low, high] (or (low, high] with `low_open`)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label} must be a number in {interval}, got {value!r}.") from None
    if not math.isfinite(number) or number > high or number < low or (low_open and number == low):
        raise ValueError(f"{label} must be a number in {interval}, got {number:g}.")
    return number


def parse_settings(
    answer_length: Any, steps: Any, threshold: Any, algorithm: Any, temperature: Any, top_p: Any, use_cache: Any,
    template: Any,
) -> DemoSettings:
    """The page's fields, in the order the page lists them, as checked settings."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"Algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}.")
    return DemoSettings(
        answer_length=whole_number("Answer length", answer_length, 1, MAX_ANSWER_LENGTH),
        steps=whole_number("Steps", steps, 0, MAX_ANSWER_LENGTH, empty=0) or None,
        threshold=number_in("Threshold", threshold, 0.0, 1.0),
        algorithm=algorithm,
        temperature=number_in("Temperature", temperature, 0.0, 10.0),
        top_p=number_in("Top-p", top_p, 0.0, 1.0, low_open=True),
        use_cache=bool(use_cache),
        template=template.strip() if isinstance(template, str) else "",
    )


def template_ids(text: str, tokenizer) -> torch.Tensor | None:
    """The structure prior's ids (`<|mask|>` marks each slot to fill), or None without a template."""
    if not text:
        return None
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if not bool((ids == tokenizer.mask_token_id).any()):
        raise ValueError(
            f"The template has no {tokenizer.mask_token} slot to fill; write {tokenizer.mask_token} where the model "
            f'should write, e.g. {{"colour": "{tokenizer.mask_token}{tokenizer.mask_token}"}}.'
        )
    return ids


def generate_kwargs(settings: DemoSettings, template: torch.Tensor | None) -> dict[str, Any]:
    """`model.generate` keywords for these settings (temperature 0 decodes greedily; above 0 it samples)."""
    return {
        "max_new_tokens": template.numel() if template is not None else settings.answer_length,
        "steps": settings.steps,
        "alg": settings.algorithm,
        "alg_p_threshold": settings.threshold,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "use_cache": settings.use_cache,
        "response_template": template,
    }


def settings_from_config(config) -> DemoSettings:
    """The page's starting values: the model's own generation config, so an untouched page decodes as
    `model.generate(**inputs)` does."""
    return DemoSettings(
        answer_length=config.max_new_tokens or DEFAULT_ANSWER_LENGTH,
        steps=config.steps,
        threshold=config.alg_p_threshold or 0.0,
        algorithm=config.alg,
        temperature=config.effective_temperature(),
        top_p=config.top_p if config.top_p is not None else 1.0,
        use_cache=config.use_cache,
    )
