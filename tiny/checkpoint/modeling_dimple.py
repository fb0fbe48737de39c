"""Dimple: Qwen2.5-VL vision tower -> MLP projector -> bidirectional M-RoPE Qwen2 decoder -> untied LM head.

The weight layout is the released one (`visual.*`, `img_projector.*`, `model.*`, `lm_head.*`). The vision tower,
the decoder layer and the attention backends are transformers' own; what is Dimple-specific lives here: the
multimodal rotary positions, the projector, bidirectional masking and the logit convention (the output at
position i predicts token i + 1; the diffusion sampler shifts it by one).
"""

import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2DecoderLayer, Qwen2RMSNorm
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .compat_dimple import CACHE_ARG, accepts_legacy_cache_name, cache_kwargs
from .configuration_dimple import DimpleConfig
from .generation_utils import DimpleGenerationMixin
from .loading_dimple import check_finite_weights, check_loading_info, refuse_pickle_only_folder


# The Auto classes users and pipelines load Dimple with: registered by `import dimple`, named in saved auto_maps.
MODEL_AUTO_CLASSES = ("AutoModel", "AutoModelForImageTextToText", "AutoModelForCausalLM")


def auto_map_reference(cls: type) -> str:
    """`module.Class`, as an auto_map names a class of a flat remote-code folder."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


@dataclass
class DimpleModelOutput(CausalLMOutputWithPast):
    """Output of `DimpleModel.forward`: transformers' causal-LM output (whose cache field is named as the installed
    release names it) plus `rope_deltas`.

    `logits[:, i]` predicts token `i + 1` (autoregressive convention kept from the Dream/Qwen initialisation).
    `rope_deltas` (per row: largest M-RoPE position + 1 - sequence length) lets a cached step place new tokens.
    """

    rope_deltas: torch.LongTensor | None = None


class DimpleRotaryEmbedding(nn.Module):
    """Multimodal RoPE: each head's rotary channels are split into temporal, height and width chunks.

    The frequency table is a float32 buffer; `DimplePreTrainedModel._apply` keeps it float32 when the model is
    cast, because bf16 frequencies visibly shift positions beyond a few hundred tokens.

    Why not transformers' `Qwen2_5_VLRotaryEmbedding`: Dimple's decoder layer is Qwen2's, whose attention applies
    one merged (batch, seq, head_dim) table, and on the older releases we support (5.12) Qwen2.5-VL's rotary module
    returns one table per M-RoPE component, merged only inside Qwen2.5-VL's own attention. Merging here gives the
    same numbers on every supported release.
    """

    def __init__(self, config: DimpleConfig):
        super().__init__()
        scaling = config.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", "mrope"):
            raise ValueError(f"Dimple supports only plain (mrope) rotary embeddings, got rope_scaling={scaling}.")
        self.config = config
        self.rope_type = "default"
        self.mrope_section = list(config.mrope_section)
        inv_freq, self.attention_scaling = self.compute_default_rope_parameters(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: DimpleConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        dim = config.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
        return 1.0 / (config.rope_theta**exponents), 1.0

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`position_ids` is (3, batch, seq); returns cos/sin of shape (batch, seq, head_dim) in `x.dtype`."""
        angles = position_ids[..., None].float() * self.inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1)
        chunks = self.mrope_section * 2
        cos = torch.cat([part[i % 3] for i, part in enumerate(angles.cos().split(chunks, dim=-1))], dim=-1)
        sin = torch.cat([part[i % 3] for i, part in enumerate(angles.sin().split(chunks, dim=-1))], dim=-1)
        return cos.to(x.dtype), sin.to(x.dtype)


class DimpleDecoderLayer(Qwen2DecoderLayer):
    """A Qwen2 decoder layer whose attention is bidirectional unless the config asks for causal training."""

    def __init__(self, config: DimpleConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn.is_causal = not config.full_attn_mask


class DimpleImageProjector(nn.Module):
    """Two-layer MLP from the vision tower's output width to the decoder width."""

    def __init__(self, config: DimpleConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_config.out_hidden_size, config.hidden_size, bias=True)
        self.act = ACT2FN[config.hidden_act]
        self.linear_2 = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


class DimplePreTrainedModel(PreTrainedModel):
    config: DimpleConfig
    config_class = DimpleConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["DimpleDecoderLayer", "Qwen2_5_VLVisionBlock"]
    _skip_keys_device_placement = [CACHE_ARG]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": DimpleDecoderLayer, "attentions": Qwen2Attention}

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike | None, *args, use_safetensors: bool | None = None,
        strict: bool = True, **kwargs,
    ):
        """`PreTrainedModel.from_pretrained`, reading safetensors weights only unless `use_safetensors=False`, and
        refusing incomplete or non-finite weights unless `strict=False`.

        transformers falls back to pickle files (`pytorch_model.bin`) when a checkpoint has no safetensors, and
        unpickling can run code; here that fallback is an explicit opt-in for sources the user trusts. It also
        leaves parameters without weights randomly initialised and ignores weights without parameters (a config
        that disagrees with the checkpoint); that is an error here, naming the keys (see `loading_dimple`).
        """
        if use_safetensors is None and kwargs.get("gguf_file") is None:
            refuse_pickle_only_folder(pretrained_model_name_or_path, kwargs.get("subfolder", ""))
            use_safetensors = True
        wants_info = kwargs.pop("output_loading_info", False)
        if strict:  # shape mismatches are then reported by name below, not as transformers' RuntimeError
            kwargs.setdefault("ignore_mismatched_sizes", True)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *args, use_safetensors=use_safetensors, output_loading_info=True, **kwargs
        )
        check_loading_info(pretrained_model_name_or_path, info, strict)
        check_finite_weights(pretrained_model_name_or_path, model, strict)
        return (model, info) if wants_info else model

    def _apply(self, fn, recurse: bool = True):
        """Cast like any module, except that rotary frequency tables stay float32."""
        rotary_tables = {
            name: buffer
            for name, buffer in self.named_buffers()
            if name.endswith("inv_freq") and buffer.dtype == torch.float32
        }
        super()._apply(fn, recurse)
        for name, table in rotary_tables.items():
            module_name, _, buffer_name = name.rpartition(".")
            module = self.get_submodule(module_name)
            current = getattr(module, buffer_name)
            if current.dtype != torch.float32:
                setattr(module, buffer_name, table.to(current.device))
        return self

    def set_attention_mode(self, causal: bool) -> None:
        """Switch the decoder between causal attention (the autoregressive training phases) and bidirectional
        attention (diffusion training and decoding); `config.full_attn_mask` records the mode so it is saved."""
        if not isinstance(causal, bool):
            raise TypeError(f"set_attention_mode(causal=...) takes True or False, got {causal!r}.")
        for module in self.modules():
            if isinstance(module, DimplePreTrainedModel):
                module.config.full_attn_mask = not causal
            if isinstance(module, DimpleDecoderLayer):
                module.self_attn.is_causal = causal


class DimpleTextModel(DimplePreTrainedModel):
    """The decoder stack (`model.*` in the checkpoint): embeddings, Qwen2 layers with M-RoPE, final norm."""

    def __init__(self, config: DimpleConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([DimpleDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DimpleRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @capture_outputs
    @accepts_legacy_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`position_ids` is (3, batch, seq) for M-RoPE; (batch, seq) means text-only positions."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = text_position_ids(
                inputs_embeds.shape[:2], attention_mask, cache, inputs_embeds.device
            )
        if position_ids.ndim == 2:
            position_ids = position_ids[None].expand(3, -1, -1)

        build_mask = create_bidirectional_mask if self.config.full_attn_mask else create_causal_mask
        mask = build_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            **cache_kwargs(cache),
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                **cache_kwargs(cache),
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **cache_kwargs(cache))


def text_position_ids(
    shape: torch.Size, attention_mask: torch.Tensor | None, cache: Cache | None, device: torch.device
) -> torch.LongTensor:
    """1-D positions counting real tokens only (left padding does not shift them), after any cached prefix."""
    batch_size, seq_len = shape
    past = cache.get_seq_length() if cache is not None else 0
    if attention_mask is None or attention_mask.ndim != 2:
        return torch.arange(past, past + seq_len, device=device)[None].expand(batch_size, -1)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)[:, -seq_len:]


class DimpleModel(DimplePreTrainedModel, DimpleGenerationMixin):
    """Dimple for diffusion generation: vision tower, projector, bidirectional decoder and LM head.

    `forward` returns raw logits (position i predicts token i + 1); `generate` runs discrete-diffusion decoding.
    """

    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: DimpleConfig):
        config.validate_architecture()  # again: a config edited after construction must not build absurd modules
        super().__init__(config)
        self.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(config.vision_config)
        self.img_projector = DimpleImageProjector(config)
        self.model = DimpleTextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also map every Auto class of `MODEL_AUTO_CLASSES` (pipelines use the task ones) to this class in the saved
        auto_map."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {})}
        self.config.auto_map.update({name: auto_map_reference(type(self)) for name in MODEL_AUTO_CLASSES})
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        """Vision tower + projector, in transformers' vision-language contract.

        Returns the vision tower's `BaseModelOutputWithPooling` (`last_hidden_state`, and `hidden_states` /
        `attentions` when asked for with `output_hidden_states` / `output_attentions`) whose `pooler_output` is a
        tuple with one (tokens, hidden_size) tensor of projected features per image, in the order of the
        image-pad tokens (`torch.cat` gives the rows to merge). `return_dict=False` gives a tuple.
        """
        if image_grid_thw is None:
            raise ValueError(
                "`pixel_values` were given without `image_grid_thw`; pass both, as returned by the processor."
            )
        pixel_values = pixel_values.to(dtype=self.visual.dtype, device=self.visual.device)
        image_grid_thw = image_grid_thw.to(self.visual.device)
        outputs = self.visual(pixel_values, grid_thw=image_grid_thw, return_dict=True, **kwargs)
        projected = self.img_projector(outputs.pooler_output)
        tokens_per_image = (image_grid_thw.prod(dim=-1) // self.config.vision_config.spatial_merge_size**2).tolist()
        outputs.pooler_output = projected.split(tokens_per_image)
        return outputs

    def _image_feature_rows(self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor) -> torch.Tensor:
        """All images' projected features as one (tokens, hidden_size) tensor, ready to merge."""
        return torch.cat(self.get_image_features(pixel_values, image_grid_thw, return_dict=True).pooler_output)

    def _check_image_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None,
        image_grid_thw: torch.LongTensor | None,
    ) -> None:
        """Images and their placeholders must come together and agree, before the vision tower runs.

        Without this, image-pad tokens with no images are silently read as text, and raw (uint8) pixels or a
        grid that does not describe `pixel_values` fail deep inside the vision tower or give garbage features.
        Floating `pixel_values` of another precision are cast to the tower's dtype by `get_image_features`.
        """
        num_tokens = int((input_ids == self.config.image_token_id).sum())
        if pixel_values is None and image_grid_thw is None:
            if num_tokens:
                raise ValueError(
                    f"The prompt holds {num_tokens} image tokens but no images were given; pass the `pixel_values` "
                    "and `image_grid_thw` the processor returned with it, or remove the image placeholders."
                )
            return
        if pixel_values is None or image_grid_thw is None:
            raise ValueError(
                "`pixel_values` and `image_grid_thw` go together; pass both, as returned by the processor."
            )
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values must be floating point (normalised patches from the image processor), got "
                f"{pixel_values.dtype}; pass the processor's pixel_values, not raw pixels."
            )
        if image_grid_thw.is_floating_point() or image_grid_thw.ndim != 2 or image_grid_thw.shape[-1] != 3:
            raise TypeError(
                f"image_grid_thw must be integer (frames, height, width) patch counts of shape (images, 3), got "
                f"{image_grid_thw.dtype} {tuple(image_grid_thw.shape)}; pass the processor's image_grid_thw."
            )
        patches = int(image_grid_thw.prod(dim=-1).sum())
        if pixel_values.ndim != 2 or pixel_values.shape[0] != patches:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)} but image_grid_thw describes {patches} patches; "
                "pass both from the same processor call."
            )
        features = patches // self.config.vision_config.spatial_merge_size**2
        if num_tokens != features:
            raise ValueError(
                f"Image features and image tokens do not match: the text holds {num_tokens} image tokens but the "
                f"images give {features} features. Build inputs with the processor, which expands each image "
                "placeholder to the number of tokens its grid needs (one image per placeholder)."
            )

    def _merge_image_features(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Write the projected image features into the embedding rows of the image-pad tokens (their counts agree:
        `_check_image_inputs` ran first)."""
        image_mask = input_ids == self.config.image_token_id
        image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(image_mask[..., None], image_features)

    def _rope_positions(
        self,
        input_ids: torch.LongTensor,
        image_grid_thw: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """M-RoPE position ids (3, batch, seq) and rope deltas (batch, 1), as the released model was trained.

        Text gets equal ids in all three components, counting real tokens only; an image's tokens get
        (frame, row, column) of its merged grid, offset by where the image starts; text after an image
        continues from the largest id so far + 1. Padding gets id 1. Images are taken from `image_grid_thw`
        in order over the whole batch. `rope_deltas` = (largest id + 1) - padded length.
        """
        batch_size, seq_len = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if image_grid_thw is None:
            positions = text_position_ids(input_ids.shape, attention_mask, None, input_ids.device)
            deltas = positions.max(dim=-1, keepdim=True).values + 1 - seq_len
            return positions[None].expand(3, -1, -1), deltas

        merge = self.config.vision_config.spatial_merge_size
        image_token, vision_start = self.config.image_token_id, self.config.vision_start_token_id
        grids = iter(image_grid_thw.tolist())
        ids_rows, mask_rows = input_ids.tolist(), attention_mask.bool().tolist()
        position_ids = torch.ones(3, batch_size, seq_len, dtype=torch.long)
        deltas = []
        for row, (ids, keep) in enumerate(zip(ids_rows, mask_rows)):
            tokens = [token for token, real in zip(ids, keep) if real]
            num_images = sum(
                1 for a, b in zip(tokens, tokens[1:]) if a == vision_start and b == image_token
            )
            pieces, next_position, cursor = [], 0, 0
            for _ in range(num_images):
                start = tokens.index(image_token, cursor)
                frames, height, width = next(grids)
                height, width = height // merge, width // merge
                text = torch.arange(start - cursor) + next_position
                pieces.append(text[None].expand(3, -1))
                base = next_position + start - cursor
                grid = torch.stack(
                    torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
                ).flatten(1)
                pieces.append(grid + base)
                next_position = base + max(frames, height, width)
                cursor = start + frames * height * width
            tail = torch.arange(len(tokens) - cursor) + next_position
            pieces.append(tail[None].expand(3, -1))
            row_positions = torch.cat(pieces, dim=1)
            position_ids[:, row, torch.tensor(keep, dtype=torch.bool)] = row_positions
            deltas.append(int(row_positions.max()) + 1 - seq_len if row_positions.numel() else -seq_len)
        device = input_ids.device
        return position_ids.to(device), torch.tensor(deltas, device=device).unsqueeze(1)

    @can_return_tuple
    @accepts_legacy_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        rope_deltas: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> DimpleModelOutput:
        """One bidirectional pass.

        Positions: computed here (M-RoPE from `input_ids`, `image_grid_thw`, `attention_mask`) unless given; with
        a non-empty `cache` the new tokens continue after the cached prefix using `rope_deltas`.
        `logits_to_keep`: an int keeps the last n positions; a bool (batch, seq) tensor keeps the True positions,
        and a long (n, 2) tensor of (row, position) pairs keeps those (the sampler's form: its size is known on
        the host, so no synchronisation); both return logits of shape (n, vocab), for masked positions only.
        `labels` gives the autoregressive next-token loss (the diffusion loss lives in the trainer).
        Images: `pixel_values` are always merged. With `inputs_embeds`, the image-pad positions (and the M-RoPE
        positions) come from `input_ids` when both are passed, else from `mm_token_type_ids` (1 = image token, as
        the processor returns it), else from the rows equal to the image-pad token's embedding (what embedding
        `input_ids` gives). Embeddings with images already merged take `input_ids` or `position_ids` plus
        `image_grid_thw` for their positions.
        """
        if pixel_values_videos is not None or video_grid_thw is not None:
            raise ValueError("Dimple was not trained on video; pass video frames as individual images instead.")
        inputs_embeds, placeholder_ids = self._embed_inputs(
            input_ids, inputs_embeds, pixel_values, image_grid_thw, mm_token_type_ids, position_ids is not None
        )
        if position_ids is None:
            position_ids, rope_deltas = self._resolve_position_ids(
                placeholder_ids, inputs_embeds, image_grid_thw, attention_mask, cache, rope_deltas
            )

        outputs = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dtype == torch.bool:
            hidden_states = hidden_states[logits_to_keep]
        elif isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.ndim == 2:
            hidden_states = hidden_states[logits_to_keep[:, 0], logits_to_keep[:, 1]]
        elif isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return DimpleModelOutput(
            loss=loss,
            logits=logits,
            **cache_kwargs(cache),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            rope_deltas=rope_deltas,
        )

    def _embed_inputs(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        image_grid_thw: torch.LongTensor | None,
        mm_token_type_ids: torch.Tensor | None,
        has_position_ids: bool,
    ) -> tuple[torch.Tensor, torch.LongTensor | None]:
        """Input embeddings with the image features merged, and the token ids that place the images.

        Pixels that were passed are never dropped: when their placeholders cannot be found the merge fails with
        a message naming what to pass.
        """
        if input_ids is None and inputs_embeds is None:
            raise ValueError("Pass `input_ids` or `inputs_embeds`.")
        if input_ids is not None and inputs_embeds is not None and input_ids.shape != inputs_embeds.shape[:2]:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and inputs_embeds {tuple(inputs_embeds.shape)} describe different "
                "sequences; pass the embeddings of these ids."
            )
        caller_embeds = inputs_embeds is not None
        if not caller_embeds:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        placeholder_ids = input_ids
        if placeholder_ids is None and (pixel_values is not None or image_grid_thw is not None):
            placeholder_ids = self._image_placeholder_ids(inputs_embeds, mm_token_type_ids)
        if pixel_values is not None or not caller_embeds:
            self._check_image_inputs(placeholder_ids, pixel_values, image_grid_thw)
        elif placeholder_ids is not None and not has_position_ids and image_grid_thw is None:
            count = int((placeholder_ids == self.config.image_token_id).sum())
            if count:
                raise ValueError(
                    f"The sequence holds {count} image tokens but neither images nor `image_grid_thw` were given, "
                    "so their M-RoPE positions are unknown; pass `pixel_values` and `image_grid_thw` (or, for "
                    "embeddings with images already merged, `image_grid_thw` or `position_ids`)."
                )
        if pixel_values is not None:
            features = self._image_feature_rows(pixel_values, image_grid_thw)
            inputs_embeds = self._merge_image_features(placeholder_ids, inputs_embeds, features)
        return inputs_embeds, placeholder_ids

    def _image_placeholder_ids(
        self, inputs_embeds: torch.Tensor, mm_token_type_ids: torch.Tensor | None
    ) -> torch.LongTensor:
        """Token ids standing in for `input_ids` when only embeddings were passed: image-pad ids where the images
        go, a vision-start id before each image, -1 (no token) elsewhere; enough for the checks and M-RoPE."""
        if mm_token_type_ids is not None:
            is_image = mm_token_type_ids.to(inputs_embeds.device) == 1
        else:
            image_id = torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
            image_row = self.get_input_embeddings()(image_id).to(inputs_embeds.dtype)
            is_image = (inputs_embeds == image_row).all(dim=-1)
        return placeholder_token_ids(is_image, self.config.image_token_id, self.config.vision_start_token_id)

    def _resolve_position_ids(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor,
        image_grid_thw: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        rope_deltas: torch.LongTensor | None,
    ) -> tuple[torch.LongTensor, torch.LongTensor | None]:
        """Positions for a forward call that was given none (see `forward`)."""
        past = cache.get_seq_length() if cache is not None else 0
        if past > 0:
            if rope_deltas is None:
                raise ValueError(
                    "A forward after a cached prefix needs `rope_deltas` (returned by the first, uncached call) or "
                    "explicit `position_ids`."
                )
            steps = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)
            return (steps[None] + rope_deltas)[None].expand(3, -1, -1), rope_deltas
        if input_ids is None:
            return text_position_ids(inputs_embeds.shape[:2], attention_mask, None, inputs_embeds.device), rope_deltas
        return self._rope_positions(input_ids, image_grid_thw, attention_mask)


def placeholder_token_ids(is_image: torch.Tensor, image_token_id: int, vision_start_token_id: int) -> torch.LongTensor:
    """(batch, seq) ids from an image-position mask: `image_token_id` where True, `vision_start_token_id` just
    before each run of image positions (Dimple prompts open every image with it), -1 elsewhere."""
    starts = is_image.clone()
    starts[:, 1:] &= ~is_image[:, :-1]
    if bool(starts[:, 0].any()):
        raise ValueError(
            "An image starts the sequence, but Dimple prompts open each image with <|vision_start|>; build the "
            "prompt with the processor, or pass `input_ids` with the embeddings."
        )
    ids = torch.full(is_image.shape, -1, dtype=torch.long, device=is_image.device)
    ids[:, :-1][starts[:, 1:]] = vision_start_token_id
    return ids.masked_fill(is_image, image_token_id)


DimpleModel.register_for_auto_class("AutoModel")

__all__ = ["DimpleModel", "DimplePreTrainedModel", "DimpleTextModel", "DimpleModelOutput"]
