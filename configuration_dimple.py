"""Configuration of Dimple: a Qwen2.5-VL vision tower, an MLP projector and a bidirectional Dream decoder.

Both classes read the released `rp-yu/Dimple-7B` config.json as it is: its keys are flat (`mrope_section`,
`full_attn_mask` and every special-token id live at the top level) and keys equal to the original class
defaults are omitted, so the defaults below are the original ones, not the 7B values.
"""

from transformers import PreTrainedConfig
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

from .compat_dimple import CACHE_ARG


class DimpleVisionConfig(Qwen2_5_VLVisionConfig):
    """The Qwen2.5-VL vision tower's configuration with the defaults Dimple was released with.

    Subclassing transformers' own vision config lets `Qwen2_5_VisionTransformerPretrainedModel` consume it
    directly (rotary parameters, attention implementation and all).
    """

    model_type = "dimple_vision"
    base_config_key = "vision_config"

    depth: int = 32
    hidden_size: int = 1280
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: list[int] | tuple[int, ...] = (7, 15, 23, 31)

    def __post_init__(self, **kwargs):
        # The released file tags the nested vision dict with the parent's model_type ("dimple"), and
        # older exports carry passthrough aliases; none of them is a setting of the tower.
        for legacy_key in ("model_type", "in_chans", "spatial_patch_size"):
            kwargs.pop(legacy_key, None)
        super().__post_init__(**kwargs)


class DimpleConfig(PreTrainedConfig):
    """Configuration of `DimpleModel`.

    `full_attn_mask=True` (the released value) makes the decoder bidirectional; `False` gives the causal
    attention of the autoregressive training phases. `mrope_section` splits each head's rotary channels
    into (temporal, height, width) chunks for multimodal RoPE.
    """

    model_type = "dimple"
    keys_to_ignore_at_inference = [CACHE_ARG]
    sub_configs = {"vision_config": DimpleVisionConfig}
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = False
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    mrope_section: list[int] | tuple[int, ...] = (16, 24, 24)
    full_attn_mask: bool = True
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    attention_dropout: float = 0.0
    mask_token_id: int = 151666
    pad_token_id: int | None = 151643
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision_token_id: int = 151654
    vision_config: dict | DimpleVisionConfig | None = None

    def __post_init__(self, **kwargs):
        if self.vision_config is None:
            self.vision_config = DimpleVisionConfig()
        elif isinstance(self.vision_config, dict):
            self.vision_config = DimpleVisionConfig(**self.vision_config)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if not self.use_sliding_window:
            self.sliding_window = None
        self.mrope_section = list(self.mrope_section)
        super().__post_init__(**kwargs)
        self.validate_architecture()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate_architecture(self) -> None:
        """Fail at construction on shapes the decoder cannot run, rather than deep inside a forward pass."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})."
            )
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(
                f"mrope_section {self.mrope_section} must sum to head_dim / 2 = {self.head_dim // 2}; "
                "each entry is the number of rotary frequencies given to the temporal, height and width positions."
            )


__all__ = ["DimpleConfig", "DimpleVisionConfig"]

DimpleConfig.register_for_auto_class()
