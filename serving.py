"""`dimple serve`: serve a Dimple checkpoint with transformers' own OpenAI-compatible server (`transformers serve`).

No HTTP code lives here: this module only tells `transformers serve` about Dimple, then starts it. Plain
`transformers serve` cannot serve a model class that lives outside transformers, even with `--trust-remote-code`,
because its model manager (5.12 to 5.24):

1. resolves the class by name in the transformers namespace: `getattr(transformers, config.architectures[0])`,
   which has no `DimpleModel` (AttributeError);
2. decides the modality (text-only or vision) by looking the class name up in transformers' Auto tables
   (`Unknown modality for: DimpleModel`);
3. asks for a 1,024-token answer whenever a request has no `max_tokens`: for a diffusion model that is a 1,024-slot
   canvas decoded as a whole, not an upper bound that an end-of-text token cuts short;
4. counts the whole returned canvas as the completion, so every non-streamed answer reports
   `finish_reason="length"` (and `transformers chat`-style clients offer to "continue") although Dimple ended it
   with `<|endoftext|>` padding.

`register_dimple_with_serve` fixes exactly these, in this process only: it puts `DimpleModel` in the transformers
namespace, adds `dimple` to the image-text-to-text table (modality VLM), makes a request without `max_tokens` use
the checkpoint's own `max_new_tokens` (generation_config.json, else Dimple's default 64), and cuts a non-streamed
Dimple completion at its first end-of-text token. Everything else (routes, streaming, request parsing,
`generation_config` pass-through, model loading, one request at a time per model) is transformers' code.
"""

import sys
from collections.abc import Callable
from typing import Any

import transformers

from .generation_config_dimple import DimpleGenerationConfig
from .modeling_dimple import DimpleModel
from .sampling_dimple import answer_lengths, stop_token_ids
from .tiny.bundled import BUNDLED_CHECKPOINT

SERVE_EXTRA_HINT = 'install the server with `pip install "dimple-hf[serve]"` (transformers[serving] and openai)'


def dimple_canvas_default(build: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap `BaseHandler._build_generation_config` so that Dimple keeps its own answer length by default.

    transformers raises any default below 1,024 to 1,024 (a generous bound for autoregressive models, which stop
    at end-of-text); Dimple's answer length is its canvas size, so a Dimple request that names no length gets the
    checkpoint's `max_new_tokens`. Requests with `max_tokens` (applied after this by the endpoint handler) or a
    `generation_config` JSON are left as transformers builds them; other models are untouched.
    """

    def build_generation_config(self, body: dict, model_generation_config, *args, **kwargs):
        config = build(self, body, model_generation_config, *args, **kwargs)
        if isinstance(model_generation_config, DimpleGenerationConfig) and body.get("generation_config") is None:
            config.max_new_tokens = model_generation_config.max_new_tokens or DimpleGenerationConfig().max_new_tokens
        return config

    build_generation_config.dimple_canvas_default = True
    return build_generation_config


def dimple_answer_cut(generate_non_streaming: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap `GenerateManager.generate_non_streaming` so that a Dimple completion ends at its first end-of-text.

    Dimple returns the whole canvas; the padding after the answer is not generated text. Cutting it gives the
    right `finish_reason` ("stop" unless the answer filled the canvas) and `completion_tokens`; the text, decoded
    with special tokens skipped, is unchanged.
    """

    async def generate(self, model, processor, inputs, gen_config, *args, **kwargs):
        text, input_len, generated_ids = await generate_non_streaming(
            self, model, processor, inputs, gen_config, *args, **kwargs
        )
        if isinstance(model, DimpleModel):
            generated_ids = generated_ids[: int(answer_lengths(generated_ids[None], stop_token_ids(model.config))[0])]
        return text, input_len, generated_ids

    generate.dimple_answer_cut = True
    return generate


def register_dimple_with_serve() -> None:
    """Make `transformers serve`, in this process, load Dimple checkpoints as vision-language models.

    Idempotent. Raises ImportError naming the install command when transformers' serving extras are missing.
    """
    try:
        from transformers.cli.serving.utils import BaseHandler, GenerateManager
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    except ImportError as error:
        raise ImportError(f"transformers serve is not available ({error}); {SERVE_EXTRA_HINT}") from error

    # `getattr(transformers, config.architectures[0])` is how serve finds a non-multimodal-LM model class.
    setattr(transformers, DimpleModel.__name__, DimpleModel)
    # Serve's modality table (and its `/v1/models` listing of cached checkpoints): Dimple takes images and text.
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.setdefault("dimple", DimpleModel.__name__)
    if not getattr(BaseHandler._build_generation_config, "dimple_canvas_default", False):
        BaseHandler._build_generation_config = dimple_canvas_default(BaseHandler._build_generation_config)
    if not getattr(GenerateManager.generate_non_streaming, "dimple_answer_cut", False):
        GenerateManager.generate_non_streaming = dimple_answer_cut(GenerateManager.generate_non_streaming)


def serve_arguments(argv: list[str]) -> list[str]:
    """`transformers serve` arguments for `dimple serve ARGV`: the bundled tiny checkpoint when no model is named.

    The model, when given, comes first (as in `transformers serve MODEL --port ...`); everything is passed on
    unchanged, so every `transformers serve` option works.
    """
    if argv and not argv[0].startswith("-"):
        return list(argv)
    if any(flag in argv for flag in ("--help", "-h")):
        return list(argv)
    return [str(BUNDLED_CHECKPOINT), *argv]


def serve(argv: list[str]) -> int:
    """Entry point of `dimple serve`: register Dimple, then run transformers' own `serve` command."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        sys.stderr.write(f"dimple: error: transformers serve needs FastAPI, uvicorn and openai; {SERVE_EXTRA_HINT}\n")
        return 2
    register_dimple_with_serve()
    from transformers.cli.transformers import app

    # standalone_mode=False: typer returns instead of calling sys.exit, so `dimple` chooses the exit code.
    app(["serve", *serve_arguments(argv)], prog_name="dimple", standalone_mode=False)
    return 0
