"""Processor for Dimple: image processor + tokenizer + chat template.

Dimple's multimodal input format is Qwen2-VL's (each ``<|image_pad|>`` is expanded to one token per 2x2
merged patch group), so we subclass ``Qwen2VLProcessor`` and keep its ``__call__``. Two things differ:

* no video processor: Qwen2-VL's needs torchvision and the Dimple model cannot consume videos anyway
  (passing videos raises);
* padding is always on the left: the diffusion decoder appends the masked response block after the last
  prompt column, so every prompt of a batch must end there.
"""

from typing import Any

from transformers.image_utils import make_flat_list_of_images
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

# The chat template the released checkpoint was trained and evaluated with (Qwen2-VL's prompt format,
# without generation tags). Written out with whitespace control so that only the quoted strings are emitted:
# * a default system turn unless the conversation starts with one;
# * each turn is ``<|im_start|>{role}\n{content}<|im_end|>\n``;
# * list content: images (``type == "image"`` or an ``image``/``image_url`` key) become
#   ``<|vision_start|><|image_pad|><|vision_end|>``, videos the same with ``<|video_pad|>``, each optionally
#   preceded by ``Picture k: ``/``Video k: `` (numbered across the whole conversation) when
#   ``add_vision_id`` is true; text items are concatenated with no separator.
DEFAULT_CHAT_TEMPLATE = r"""
{%- set counter = namespace(images=0, videos=0) -%}
{%- for message in messages -%}
    {%- if loop.first and message['role'] != 'system' -%}
        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}
    {%- endif -%}
    {{- '<|im_start|>' + message['role'] + '\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- else -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}
                {%- set counter.images = counter.images + 1 -%}
                {%- if add_vision_id -%}
                    {{- 'Picture ' + counter.images | string + ': ' -}}
                {%- endif -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif item['type'] == 'video' or 'video' in item -%}
                {%- set counter.videos = counter.videos + 1 -%}
                {%- if add_vision_id -%}
                    {{- 'Video ' + counter.videos | string + ': ' -}}
                {%- endif -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif 'text' in item -%}
                {{- item['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
""".strip()


class DimpleProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor without a video processor, with Dimple's chat template and left padding.

    ``__call__`` (apart from refusing videos) and ``apply_chat_template`` are inherited: images go through
    the image processor, each ``<|image_pad|>`` in the text is expanded to ``t * h * w / merge_size**2``
    copies (grids consumed in order across the batch), then the text is tokenised. Outputs: ``input_ids``,
    ``attention_mask``, ``mm_token_type_ids`` and, with images, ``pixel_values`` and ``image_grid_thw``.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template: str | None = None, **kwargs) -> None:
        # No `video_processor` parameter: ProcessorMixin derives the sub-processors from this signature, so
        # leaving it out keeps torchvision (needed by Qwen2-VL's video processor) optional.
        if chat_template is None:
            chat_template = DEFAULT_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
        # Released tokenizer configs may say "right" (training padded on the right); generation needs left.
        self.tokenizer.padding_side = "left"

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        """Process images and text; ``videos`` must be ``None``.

        Without a video processor, ``ProcessorMixin`` would silently drop videos and leave each
        ``<|video_pad|>`` unexpanded, so we refuse them instead.
        """
        if videos is not None:
            raise ValueError("DimpleProcessor does not process videos (Dimple has no video support); pass videos=None.")
        return super().__call__(images=images, text=text, **kwargs)

    def validate_inputs(
        self, images: Any = None, text: str | list[str] | None = None, videos: Any = None, audio: Any = None, **kwargs
    ) -> None:
        """One image per placeholder, counted over the whole batch, with a message that says how to fix it."""
        if text is not None:
            samples = [text] if isinstance(text, str) else [sample for sample in text if isinstance(sample, str)]
            placeholders = sum(sample.count(self.image_token) for sample in samples)
            count = 0 if images is None else len(make_flat_list_of_images(images))
            if placeholders != count:
                raise ValueError(
                    f"The text has {placeholders} image placeholders but {count} images were passed; give exactly "
                    "one image per placeholder, in order (one {\"type\": \"image\"} entry per image in the chat "
                    "messages; apply_chat_template writes the placeholders)."
                )
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """Decode generated ids, each row cut at its first ``<|endoftext|>`` after its first real token.

        A diffusion answer fills all its slots; the model ends the text with ``<|endoftext|>`` and anything the
        canvas holds after that is not part of the answer. Leading ``<|endoftext|>`` are left padding.
        """
        batch = generated_outputs if len(generated_outputs.shape) == 2 else [generated_outputs]
        rows = [list(map(int, row)) for row in batch]
        stop = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        cut = []
        for row in rows:
            start = next((i for i, token in enumerate(row) if token != stop), len(row))
            end = next((i for i in range(start, len(row)) if row[i] == stop), len(row))
            cut.append(row[:end])
        return super().post_process_image_text_to_text(cut, skip_special_tokens=skip_special_tokens, **kwargs)


DimpleProcessor.register_for_auto_class()
