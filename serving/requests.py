"""Checking one `/v1/chat/completions` body: every client mistake becomes a `RequestError` naming the field.

What a request may say is listed here: the OpenAI fields Dimple honours, the ones it accepts only at their neutral
values (refused by name otherwise, never ignored), and Dimple's own settings in `generation_config` (a JSON string,
as transformers' server and `transformers chat` send it, or an object), checked by `DimpleGenerationConfig.validate`,
whose messages the client receives. Pictures are read under the media policy (`media.py`); message text is escaped
so a client's `<|im_start|>` or `<|mask|>` stays text.
"""

import copy
import json
import math
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..generation_config_dimple import DimpleGenerationConfig
from .errors import RequestError
from .media import fetch_picture
from .options import Limits

# OpenAI fields that change the answer in ways Dimple does not implement: accepted absent, null or neutral.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "functions": ([],),
    "function_call": ("none", "auto"),
    "response_format": ({"type": "text"},),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logit_bias": ({},),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "web_search_options": (),
    "tool_prompt": (),
    "store": (False,),
}
# Fields that never change the answer (bookkeeping for the client): accepted as they come.
INERT_FIELDS = ("user", "metadata", "service_tier", "parallel_tool_calls", "safety_identifier", "prompt_cache_key")
HONOURED_FIELDS = (
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "seed", "stop", "generation_config",
)
# generation_config fields a client may not set: they change the reply's shape or the server's own resources.
OPERATOR_SETTINGS = {
    "return_dict_in_generate": "the server returns text, not generate()'s output object",
    "output_history": "the server returns text, not generate()'s output object",
    "output_scores": "the server returns text, not generate()'s output object",
    "compile_forward": "compilation is the operator's choice (it costs minutes per new shape)",
    "compile_config": "compilation is the operator's choice (it costs minutes per new shape)",
    "max_length": "the answer length is max_tokens (or max_new_tokens); the prompt's length is the server's count",
    "mask_token_id": "the model's token ids are fixed by the checkpoint",
    "pad_token_id": "the model's token ids are fixed by the checkpoint",
    "eos_token_id": "the model's token ids are fixed by the checkpoint",
    "bos_token_id": "the model's token ids are fixed by the checkpoint",
}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS = 4
MAX_SEED = 2**63 - 1


@dataclass
class ChatRequest:
    """A checked request: the conversation for the processor (pictures decoded), generate() settings, options."""

    conversation: list[dict]
    settings: dict[str, Any]
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    pictures: list[Image.Image] = field(default_factory=list)


def check_fields(body: dict) -> None:
    for name, value in body.items():
        if name in HONOURED_FIELDS or name in INERT_FIELDS:
            continue
        if name not in NEUTRAL_VALUES:
            raise RequestError(f"Unrecognized request argument supplied: {name}.", name)
        if value is not None and value is not False and value != [] and value not in NEUTRAL_VALUES[name]:
            raise RequestError(
                f"{name}={json.dumps(value)[:200]} is not supported by this Dimple server (a diffusion model: "
                f"{name} has no effect here); leave it out.", name,
            )


def parse_chat_request(body: dict, generation_defaults: DimpleGenerationConfig, limits: Limits) -> ChatRequest:
    """Everything but the model name (the app checks it) and the prompt length (known after tokenizing)."""
    check_fields(body)
    settings = generation_settings(body, limits)
    check_settings(settings, generation_defaults, limits)
    conversation, pictures = parse_messages(body.get("messages"), limits)
    stream = boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise RequestError("stream_options is an object and needs stream=true.", "stream_options")
    include_usage = bool(options and boolean(options, "include_usage"))
    return ChatRequest(conversation, settings, seed(body), stream, include_usage, pictures)


def boolean(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None or isinstance(value, bool):
        return bool(value)
    raise RequestError(f"{name} must be true or false, got {json.dumps(value)[:100]}.", name)


def seed(body: dict) -> int | None:
    value = body.get("seed")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED):
        raise RequestError(f"seed must be an integer in [0, 2**63 - 1], got {json.dumps(value)[:100]}.", "seed")
    return value


def generation_settings(body: dict, limits: Limits) -> dict[str, Any]:
    """generation_config first, then the OpenAI fields (max_tokens, temperature, top_p, stop) on top."""
    settings = dimple_settings(body.get("generation_config"))
    lengths = {name: body[name] for name in ("max_tokens", "max_completion_tokens") if body.get(name) is not None}
    if len(set(map(json.dumps, lengths.values()))) > 1:
        raise RequestError("max_tokens and max_completion_tokens differ; send one of them.", "max_tokens")
    for name, value in lengths.items():
        settings["max_new_tokens"] = checked_length(name, value, limits)
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            settings[name] = checked_number(name, body[name])
    if body.get("stop") is not None:
        settings["stop_strings"] = stop_strings(body["stop"])
    return settings


def checked_length(name: str, value: Any, limits: Limits) -> int:
    """The answer length: the canvas is allocated at once, so a huge one is refused, not attempted."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limits.max_tokens:
        raise RequestError(
            f"{name} must be an integer in 1 ... {limits.max_tokens} (this server's --max-tokens-cap; a diffusion "
            f"answer's canvas is allocated at once), got {json.dumps(value)[:100]}.", name,
        )
    return value


def checked_number(name: str, value: Any) -> int | float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise RequestError(f"{name} must be a number, got {json.dumps(value)[:100]}.", name)
    return value


def stop_strings(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOP_STRINGS or not all(
        isinstance(stop, str) and stop for stop in stops
    ):
        raise RequestError(f"stop must be a non-empty string or a list of 1 to {MAX_STOP_STRINGS} of them.", "stop")
    return stops


def dimple_settings(value: Any) -> dict[str, Any]:
    """The client's `generation_config` (JSON text or object) as generate() keywords; metadata keys dropped."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as error:
            raise RequestError(f"generation_config is not valid JSON ({error}).", "generation_config") from error
    if not isinstance(value, dict):
        raise RequestError("generation_config must be a JSON object of Dimple settings.", "generation_config")
    settings = {key: item for key, item in value.items() if key != "transformers_version" and not key.startswith("_")}
    for key, why in OPERATOR_SETTINGS.items():
        if key in settings:
            raise RequestError(f"generation_config.{key} cannot be set by a request: {why}.", "generation_config")
    return settings


def check_settings(settings: dict[str, Any], defaults: DimpleGenerationConfig, limits: Limits) -> None:
    """The settings as generate() would resolve them, checked now: DimpleGenerationConfig's own messages, the
    server's answer-length cap, one answer per request."""
    config = copy.deepcopy(defaults)
    try:
        unknown = config.update(**settings)
        if unknown:
            raise RequestError(
                f"generation_config has no setting {', '.join(sorted(unknown))}; Dimple's settings are the fields "
                "of DimpleGenerationConfig.", "generation_config",
            )
        config.validate()
    except (ValueError, TypeError) as error:
        raise RequestError(f"Invalid generation setting: {error}", "generation_config") from error
    checked_length("max_new_tokens", config.max_new_tokens, limits)
    if config.steps is not None and config.steps > limits.max_tokens:
        raise RequestError(
            f"steps={config.steps} is above this server's cap of {limits.max_tokens} forward passes.",
            "generation_config",
        )
    if config.num_return_sequences != 1:
        raise RequestError("One answer per request (n=1): num_return_sequences must be 1.", "generation_config")


def parse_messages(messages: Any, limits: Limits) -> tuple[list[dict], list[Image.Image]]:
    """The chat in the processor's format; pictures are counted before any is fetched."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects.", "messages")
    parts = [part for message in messages if isinstance(message, dict) for part in content_parts(message)]
    count = sum(1 for part in parts if isinstance(part, dict) and part.get("type") == "image_url")
    if count > limits.max_images:
        raise RequestError(
            f"The request has {count} images; this server takes at most {limits.max_images} (--max-images).",
            "messages",
        )
    pictures: list[Image.Image] = []
    conversation = [parsed_message(message, index, limits, pictures) for index, message in enumerate(messages)]
    return conversation, pictures


def content_parts(message: dict) -> list:
    content = message.get("content")
    return content if isinstance(content, list) else []


def parsed_message(message: Any, index: int, limits: Limits, pictures: list[Image.Image]) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise RequestError(f"{where} must be an object with role and content.", where)
    extra = sorted(set(message) - {"role", "content"})
    if extra:
        raise RequestError(f"{where} has unsupported fields {', '.join(extra)} (only role and content).", where)
    role = message.get("role")
    if role not in ROLES:
        raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {json.dumps(role)}.", where)
    content = message.get("content")
    if isinstance(content, str):
        return {"role": ROLES[role], "content": [{"type": "text", "text": content}]}
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or a list of content parts.", where)
    items = [content_item(part, f"{where}.content[{k}]", limits, pictures) for k, part in enumerate(content)]
    if role != "user" and any(item["type"] == "image" for item in items):
        raise RequestError(f"{where}: only user messages may hold images.", where)
    return {"role": ROLES[role], "content": items}


def content_item(part: Any, where: str, limits: Limits, pictures: list[Image.Image]) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{where}.text must be a string.", where)
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else image_url
        pictures.append(fetch_picture(url, limits, where))
        return {"type": "image", "image": pictures[-1]}
    raise RequestError(
        f"{where} has type {json.dumps(kind)}; this server reads \"text\" and \"image_url\" parts only.", where
    )
