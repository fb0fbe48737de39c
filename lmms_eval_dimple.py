"""`lmms-eval --model dimple`: Dimple in lmms-eval, the harness the paper's numbers come from.

Registered through lmms-eval's `lmms_eval.models` entry point (pyproject.toml), so installing this package with
`.[eval]` is all it takes; lmms-eval's generic `huggingface` model cannot run Dimple (it passes videos, beam and
sampling settings a diffusion decoder has no use for, and knows none of Dimple's decoding settings).

Decoding settings (`steps`, `alg`, `alg_p_threshold`, `decoding_pipeline`, `temperature`, ...; the fields of
`DimpleGenerationConfig`) come from, later winning: the checkpoint's generation_config.json, `--model_args`, the
task's `generation_kwargs`, `--gen_kwargs`. `--batch_size N` decodes up to N requests together through the batching
engine (`dimple.engine`: one forward pass per step over every active request, whatever their tasks and settings;
a finished request's place goes to the next at once), and each answer is what its prompt gives alone.
"""

import copy
import math
import re
from collections import deque
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image
from tqdm import tqdm
from transformers import AutoModel, AutoProcessor

from .engine import DiffusionEngine, EngineRequest

# The released wrapper's image pre-resize bounds (reference `_regularize_images`): sides of at least 28 pixels and
# aspect ratios up to 200 reach the processor.
MIN_SIDE = 28
MAX_ASPECT = 200
CLAMPED_ASPECT = 180
# MMMU-style numbered image markers in a question's text.
IMAGE_MARKER = re.compile(r"<image (\d+)>")


def manifest() -> ModelManifest:
    """The `lmms_eval.models` entry point: `--model dimple` is this module's `Dimple` class."""
    return ModelManifest(model_id="dimple", simple_class_path=f"{__name__}.Dimple")


def regularize_image(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """The reference evaluation's pre-resize, applied before the processor so benchmark inputs match the paper's.

    Bicubic resize by sqrt(max_pixels / area) when above `max_pixels` (or up to `min_pixels` when below), RGB,
    sides below 28 pixels enlarged to 28, aspect ratios above 200 squeezed to 180 (the processor refuses those).
    """
    image = image.convert("RGB")
    area = image.width * image.height
    if area > max_pixels or area < min_pixels:
        scale = math.sqrt((max_pixels if area > max_pixels else min_pixels) / area)
        image = image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.BICUBIC)
    if min(image.size) < MIN_SIDE:
        scale = MIN_SIDE / min(image.size)
        image = image.resize((max(MIN_SIDE, round(image.width * scale)), max(MIN_SIDE, round(image.height * scale))))
    if max(image.size) / min(image.size) > MAX_ASPECT:
        long_side = min(image.size) * CLAMPED_ASPECT
        size = (long_side, image.height) if image.width > image.height else (image.width, long_side)
        image = image.resize(size)
    return image


def decoding_kwargs(gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Split lmms-eval generation kwargs into Dimple `generate` kwargs and the `until` stop strings.

    Task files are written for autoregressive models: `num_beams: 1`, `do_sample: false` (greedy: Dimple's
    temperature 0), `top_p: 0` or None (no nucleus filter) and LLaVA's `image_aspect_ratio` carry no Dimple setting
    and are dropped; beam search does not exist in diffusion decoding and raises. Anything else goes to `generate`,
    which refuses settings Dimple does not know.
    """
    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", [])
    until = [until] if isinstance(until, str) else list(until)
    num_beams = kwargs.pop("num_beams", 1)
    if num_beams not in (None, 1):
        raise ValueError(f"num_beams={num_beams}: Dimple decodes by diffusion, without beams; use num_beams=1.")
    kwargs.pop("image_aspect_ratio", None)
    for key in ("temperature", "top_k"):
        if kwargs.get(key) is None:
            kwargs.pop(key, None)
    if not kwargs.get("top_p", 1):
        kwargs.pop("top_p")
    if kwargs.get("do_sample") is False:
        kwargs.pop("do_sample")
        kwargs["temperature"] = 0.0
    return kwargs, until


def cut_at(text: str, stops: list[str]) -> str:
    """`text` up to the first of the stop strings (lmms-eval's `until`)."""
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class Dimple(lmms):
    """A Dimple checkpoint (folder or Hub id) for lmms-eval's generation tasks.

    Model args: `pretrained` (default: the bundled tiny checkpoint), `dtype` ("auto"), `device` (CUDA when
    available), `attn_implementation`, `batch_size`, `system_prompt`, `regularize_images` (the reference
    evaluation's pre-resize, default on), `interleave_visuals` (images at their `<image k>` markers),
    `trust_remote_code`, and any decoding setting (`steps=8`, `alg=...`).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        attn_implementation: str | None = None,
        batch_size: int | str = 1,
        system_prompt: str | None = None,
        regularize_images: bool = True,
        interleave_visuals: bool = False,
        trust_remote_code: bool = False,
        **decoding: Any,
    ) -> None:
        super().__init__()
        decoding.pop("max_batch_size", None)  # lmms-eval's generic option; batches here are --batch_size
        from .tiny.bundled import BUNDLED_CHECKPOINT

        source = str(pretrained) if pretrained is not None else str(BUNDLED_CHECKPOINT)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        load = {"dtype": dtype, "trust_remote_code": trust_remote_code}
        if attn_implementation is not None:
            load["attn_implementation"] = attn_implementation
        self.model = AutoModel.from_pretrained(source, **load).to(self._device).eval()
        self.processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        self.decoding = decoding
        # Validate the settings now, not after the first batch of a long run: unknown names come back unused.
        unknown = copy.deepcopy(self.model.generation_config).update(**decoding)
        if unknown:
            raise ValueError(
                f"Unknown model_args {sorted(unknown)} for --model dimple; loading options are pretrained, dtype, "
                "device, attn_implementation, batch_size, system_prompt, regularize_images, interleave_visuals, "
                "trust_remote_code; decoding settings are fields of DimpleGenerationConfig (steps, alg, ...)."
            )
        self._batch_size = int(batch_size)
        self.system_prompt = system_prompt
        self.regularize_images = regularize_images
        self.interleave_visuals = interleave_visuals

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def conversation(self, context: str, visuals: list | None) -> list[dict]:
        """One chat: the doc's images, then its text; with `interleave_visuals`, each image where the text's
        `<image k>` marker stands (as the paper ran MMMU and MM-Vet), otherwise all images first."""
        images = [visual for visual in (visuals or []) if isinstance(visual, Image.Image)]
        if len(images) != len(visuals or []):
            raise ValueError("Dimple takes images only (PIL images from doc_to_visual); this task gives other media.")
        if self.regularize_images:
            bounds = self.processor.image_processor.size  # pixel counts: shortest_edge = min, longest_edge = max
            images = [regularize_image(image, bounds.shortest_edge, bounds.longest_edge) for image in images]
        context = context.replace("<image>", "").strip()
        markers = [int(number) for number in IMAGE_MARKER.findall(context)]
        if self.interleave_visuals and markers and all(1 <= number <= len(images) for number in markers):
            pieces = IMAGE_MARKER.split(context)  # text, number, text, number, ..., text
            unmarked = [image for number, image in enumerate(images, 1) if number not in markers]
            content = [{"type": "image", "image": image} for image in unmarked]
            for index, piece in enumerate(pieces):
                if index % 2:
                    content.append({"type": "image", "image": images[int(piece) - 1]})
                elif piece.strip():
                    content.append({"type": "text", "text": piece.strip()})
        else:
            content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": context}]
        messages = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def submit(
        self, engine: DiffusionEngine, conversation: list[dict], gen_kwargs: dict[str, Any]
    ) -> tuple[EngineRequest, list[str]]:
        """Queue one chat on the engine with its task's settings; returns the request and its `until` strings."""
        kwargs, until = decoding_kwargs(gen_kwargs)
        inputs = self.processor.apply_chat_template(
            [conversation], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        ).to(self.device)
        return engine.submit(inputs, **{**self.decoding, **kwargs}), until

    def answer(self, submitted: tuple[EngineRequest, list[str]]) -> str:
        """The request's answer text, cut at its first `until` string."""
        request, until = submitted
        text = self.processor.post_process_image_text_to_text(request.result()[None])[0]
        return cut_at(text, until).strip()

    def generate_batch(self, conversations: list[list[dict]], gen_kwargs: dict[str, Any]) -> list[str]:
        """Answers for chats sharing one set of generation kwargs, decoded together."""
        with DiffusionEngine(self.model, max_batch_size=self.batch_size) as engine:
            submitted = [self.submit(engine, conversation, gen_kwargs) for conversation in conversations]
            return [self.answer(one) for one in submitted]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answer every request, in order, `batch_size` at a time on the engine; at most twice that many are
        prepared ahead, so a long benchmark never holds all its pictures in memory."""
        results: list[str] = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Dimple answering")
        pending: deque[tuple[Instance, tuple[EngineRequest, list[str]]]] = deque()

        def collect_oldest() -> None:
            request, submitted = pending.popleft()
            results.append(self.answer(submitted))
            self.cache_hook.add_partial("generate_until", tuple(request.args[:2]), results[-1])
            progress.update(1)

        with DiffusionEngine(self.model, max_batch_size=self.batch_size) as engine:
            for request in requests:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                chat = self.conversation(context, doc_to_visual(self.task_dict[task][split][doc_id]))
                pending.append((request, self.submit(engine, chat, gen_kwargs)))
                if len(pending) > 2 * self.batch_size:
                    collect_oldest()
            while pending:
                collect_oldest()
        progress.close()
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "Dimple has no left-to-right likelihood (it is a diffusion model); use generation tasks "
            "(output_type: generate_until)."
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("Multi-round tasks are not supported by --model dimple; use single-turn tasks.")
