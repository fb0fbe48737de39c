"""Processor for Dimple: image processor + tokenizer + chat template.

Dimple's multimodal input format is Qwen2-VL's (each ``<|image_pad|>`` is expanded to one token per 2x2
merged patch group), so we subclass ``Qwen2VLProcessor`` and keep its ``__call__``. Two things differ:

* no video: Qwen2-VL's video processor needs torchvision and the Dimple model cannot consume videos, so the
  processor declares no video token (generic tooling then treats it as image + text only) and refuses videos;
* padding is always on the left: the diffusion decoder appends the masked response block after the last
  prompt column, so every prompt of a batch must end there.
"""

import re
from typing import Any

import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput, make_flat_list_of_images
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.processing_utils import ProcessingKwargs, Unpack
from transformers.tokenization_utils_base import PreTokenizedInput, TextInput

from .sampling_dimple import answer_lengths
from .tokenization_dimple import DimpleTokenizer

# Inserted after the first character of a special-token string found in untrusted text: invisible when the text is
# shown, and the string no longer matches the tokenizer's added tokens, so it is read as text.
ZERO_WIDTH_SPACE = "\u200b"

# The system turn a chat gets when it does not start with one (the released template's; training uses it too).
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

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
        {{- '<|im_start|>system\n{system_prompt}<|im_end|>\n' -}}
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
""".strip().replace("{system_prompt}", DEFAULT_SYSTEM_PROMPT)


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
        # Qwen2-VL declares a video token; Dimple has no video input, so it declares none (see the module docstring).
        self.video_token = None
        self.video_token_id = None
        # Released tokenizer configs may say "right" (training padded on the right); generation needs left.
        self.tokenizer.padding_side = "left"

    @classmethod
    def _load_tokenizer_from_pretrained(cls, sub_processor_type: str, pretrained_model_name_or_path, **kwargs):
        """Always this module's `DimpleTokenizer`, never a class named by the folder's tokenizer_config.json auto_map.

        `AutoTokenizer` with `trust_remote_code=True` imports that file even when `import dimple` registered our
        class (transformers gives a tokenizer's auto_map precedence), so a processor would run a folder's code (or
        fail on the released repo's 4.46 code) while the model loads the local classes."""
        kwargs.pop("trust_remote_code", None)
        return DimpleTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)

    def apply_chat_template(self, conversation, *args, escape_special_tokens: bool = False, **kwargs):
        """Qwen2-VL's `apply_chat_template`; with `escape_special_tokens=True`, special-token strings inside the
        messages' text (e.g. a user typing ``<|im_end|>``) stay text instead of becoming control tokens.

        Escaping covers message text only (string content and ``{"type": "text"}`` items), not roles or the
        template; see `escape_special_tokens`.
        """
        if escape_special_tokens:
            conversation = self._escaped_conversation(conversation)
        return super().apply_chat_template(conversation, *args, **kwargs)

    def escape_special_tokens(self, text: str) -> str:
        """`text` with every special-token string broken by an invisible U+200B after its first character, so the
        tokenizer reads it as text: for untrusted text placed into a prompt by hand."""
        pattern = self._special_token_pattern()
        while pattern.search(text):  # repeated in case breaking one occurrence uncovered an overlapping one
            text = pattern.sub(lambda match: match[0][0] + ZERO_WIDTH_SPACE + match[0][1:], text)
        return text

    def _special_token_pattern(self) -> re.Pattern:
        """Every added token of the tokenizer (control, vision and mask tokens), longest first."""
        tokens = {token.content for token in self.tokenizer.added_tokens_decoder.values() if len(token.content) > 1}
        return re.compile("|".join(re.escape(token) for token in sorted(tokens, key=len, reverse=True)))

    def _escaped_conversation(self, conversation: list) -> list:
        """A copy of one conversation (or a batch of them) whose message text is escaped."""
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        escaped = [[self._escaped_message(message) for message in messages] for messages in conversations]
        return escaped if batched else escaped[0]

    def _escaped_message(self, message: dict) -> dict:
        """A copy of `message` whose text content (a string, or the ``text`` of its items) is escaped."""
        content = message.get("content")
        if isinstance(content, str):
            return {**message, "content": self.escape_special_tokens(content)}
        if isinstance(content, list):
            items = [
                {**item, "text": self.escape_special_tokens(item["text"])}
                if isinstance(item, dict) and isinstance(item.get("text"), str) else item
                for item in content
            ]
            return {**message, "content": items}
        return message

    def __call__(
        self,
        images: ImageInput | None = None,
        text: TextInput | PreTokenizedInput | list[TextInput] | list[PreTokenizedInput] | None = None,
        **kwargs: Unpack[ProcessingKwargs],
    ) -> BatchFeature:
        """Process images and text.

        ``videos`` is not a parameter (generic tooling reads the signature to tell which modalities a processor
        takes), but ``videos=None`` or ``videos=[]`` is accepted as "no video", as harnesses pass it. Real videos
        are refused: without a video processor ``ProcessorMixin`` would silently drop them and leave each
        ``<|video_pad|>`` unexpanded.
        """
        videos = kwargs.pop("videos", None)
        if videos is not None and len(videos) > 0:
            raise ValueError(
                "DimpleProcessor does not process videos (Dimple has no video support); pass video frames as images "
                "(one {\"type\": \"image\"} entry each), and videos=None."
            )
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
        """Decode generated answers (the ids after the prompt), each row cut at its first ``<|endoftext|>``.

        A diffusion answer fills all its slots; the model ends the text with ``<|endoftext|>`` and anything the
        canvas holds after that is not part of the answer. An answer that starts with ``<|endoftext|>`` is empty
        (''), as the streamer, the pipelines and the server give it: the same `answer_lengths` rule.
        """
        batch = generated_outputs if len(generated_outputs.shape) == 2 else [generated_outputs]
        stop = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        cut = []
        for row in batch:
            row = torch.as_tensor(row, dtype=torch.long)
            cut.append(row[: int(answer_lengths(row[None], [stop])[0])].tolist())
        return super().post_process_image_text_to_text(cut, skip_special_tokens=skip_special_tokens, **kwargs)


DimpleProcessor.register_for_auto_class()
