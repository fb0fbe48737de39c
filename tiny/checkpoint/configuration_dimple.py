"""Configuration of Dimple: a Qwen2.5-VL vision tower, an MLP projector and a bidirectional Dream decoder.

Both classes read the released `rp-yu/Dimple-7B` config.json as it is: its keys are flat (`mrope_section`,
`full_attn_mask` and every special-token id live at the top level) and keys equal to the original class
defaults are omitted, so the defaults below are the original ones, not the 7B values.
"""

from typing import Any

from transformers import PreTrainedConfig
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

from .compat_dimple import CACHE_ARG

# Upper bounds on sizes, checked before any module is built: far above any released model (the 7B has 28 layers of
# width 3584, 152,064 rows of vocabulary), low enough that a typo (num_hidden_layers=100000) fails in microseconds
# instead of spending minutes building modules and then hundreds of GB initialising them.
DECODER_SIZE_LIMITS = {
    "vocab_size": 2**24,
    "hidden_size": 2**16,
    "intermediate_size": 2**18,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "max_position_embeddings": 2**24,
}
VISION_SIZE_LIMITS = {
    "depth": 1024,
    "hidden_size": 2**16,
    "intermediate_size": 2**18,
    "num_heads": 1024,
    "out_hidden_size": 2**16,
    "patch_size": 1024,
    "spatial_merge_size": 64,
    "temporal_patch_size": 64,
}
MAX_PARAMETERS = 2 * 10**12
# Ids the model itself looks up (embedding rows, M-RoPE layout, the mask canvas): they must be rows of the vocabulary.
IDS_IN_VOCABULARY = ("mask_token_id", "pad_token_id", "bos_token_id", "image_token_id", "vision_start_token_id")
# Ids that must never equal the mask token: decoding bans the mask token as an answer, so a shared id would ban
# end-of-text or padding, and a prompt token equal to it would be read as a slot to fill.
IDS_DISTINCT_FROM_MASK = (
    "pad_token_id", "bos_token_id", "eos_token_id", "image_token_id", "video_token_id", "vision_start_token_id",
    "vision_end_token_id", "vision_token_id",
)


def check_size(owner: str, name: str, value: Any, limit: int) -> None:
    """A size field must be a positive int no larger than `limit`; the message names the field and the fix."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{owner}.{name} must be an integer, got {value!r} ({type(value).__name__}); write it as a plain number "
            "(no quotes) in config.json."
        )
    if not 1 <= value <= limit:
        raise ValueError(
            f"{owner}.{name} must lie in [1, {limit}], got {value}; check config.json (a Dimple model needs a "
            "positive size, and values above the bound are almost certainly a typo)."
        )


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
        self.validate_sizes()
        super().__post_init__(**kwargs)

    def validate_sizes(self) -> None:
        """Types, positivity, bounds and head divisibility of the tower, before a block is built."""
        for name, limit in VISION_SIZE_LIMITS.items():
            check_size("vision_config", name, getattr(self, name), limit)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision_config.hidden_size ({self.hidden_size}) must be divisible by vision_config.num_heads "
                f"({self.num_heads})."
            )

    def estimated_parameters(self) -> int:
        """Roughly the tower's parameter count (blocks and merger), for the size bound of `DimpleConfig`."""
        merged = self.hidden_size * self.spatial_merge_size**2
        block = 4 * self.hidden_size**2 + 3 * self.hidden_size * self.intermediate_size
        return self.depth * block + merged * (merged + self.out_hidden_size)


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
        elif not isinstance(self.vision_config, Qwen2_5_VLVisionConfig):
            raise TypeError(
                f"vision_config must be a dict or a DimpleVisionConfig, got {type(self.vision_config).__name__}."
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if not self.use_sliding_window:
            self.sliding_window = None
        self.mrope_section = list(self.mrope_section)
        self.validate_architecture()
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """A config file must describe its vision tower: without one the 7B tower's defaults would be built silently
        (half a billion parameters) under whatever decoder the file describes."""
        if not isinstance(config_dict, dict):
            raise TypeError(f"A Dimple config must be a JSON object, got {type(config_dict).__name__}.")
        if "vision_config" not in config_dict:
            raise ValueError(
                "The Dimple config has no vision_config; every Dimple checkpoint's config.json carries one (the "
                "released rp-yu/Dimple-7B file does). Restore it from the original checkpoint."
            )
        return super().from_dict(config_dict, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate_architecture(self) -> None:
        """Fail at construction (and again before a model is built from a config edited since) on values the decoder
        cannot run, rather than with a ZeroDivisionError, an AssertionError deep in torch, or after allocating GBs."""
        for name, limit in DECODER_SIZE_LIMITS.items():
            check_size("config", name, getattr(self, name), limit)
        self.vision_config.validate_sizes()
        self.validate_special_ids()
        parameters = self.estimated_parameters()
        if parameters > MAX_PARAMETERS:
            raise ValueError(
                f"This config describes about {parameters / 1e9:,.0f}B parameters (more than "
                f"{MAX_PARAMETERS / 1e9:,.0f}B); check num_hidden_layers, hidden_size, intermediate_size and "
                "vocab_size in config.json."
            )
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
        if self.use_sliding_window:
            raise ValueError(
                "use_sliding_window=True is not supported: Dimple's decoder attends over the whole sequence in both "
                "directions (the released model was trained that way, and a diffusion step reads the entire canvas). "
                "Set use_sliding_window=False."
            )

    def validate_special_ids(self) -> None:
        """Special ids are integers inside the vocabulary, and the mask token shares its id with none of them."""
        for name in (*IDS_IN_VOCABULARY, *IDS_DISTINCT_FROM_MASK):
            for value in self.token_ids(name):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise TypeError(f"config.{name} must be an integer token id, got {value!r}.")
        for name in IDS_IN_VOCABULARY:
            for value in self.token_ids(name):
                if not 0 <= value < self.vocab_size:
                    raise ValueError(
                        f"config.{name}={value} lies outside the vocabulary [0, {self.vocab_size}); use the id the "
                        "checkpoint's tokenizer gives that token, or enlarge vocab_size."
                    )
        for name in IDS_DISTINCT_FROM_MASK:
            if self.mask_token_id in self.token_ids(name):
                raise ValueError(
                    f"config.mask_token_id ({self.mask_token_id}) equals config.{name}; the mask token must have "
                    "its own id (decoding never proposes it, so sharing it would ban that token). Use the "
                    "tokenizer's <|mask|> id."
                )

    def token_ids(self, name: str) -> list[Any]:
        """The ids a special-token field holds: none, one, or (for eos_token_id) a list."""
        value = getattr(self, name)
        if value is None:
            return []
        return list(value) if isinstance(value, (list, tuple)) else [value]

    def estimated_parameters(self) -> int:
        """Roughly the parameter count (embeddings, LM head, decoder layers, projector, vision tower)."""
        kv_width = self.head_dim * self.num_key_value_heads
        layer = 2 * self.hidden_size * (self.hidden_size + kv_width) + 3 * self.hidden_size * self.intermediate_size
        projector = self.vision_config.out_hidden_size * self.hidden_size + self.hidden_size**2
        vision = self.vision_config.estimated_parameters()
        return 2 * self.vocab_size * self.hidden_size + self.num_hidden_layers * layer + projector + vision


__all__ = ["DimpleConfig", "DimpleVisionConfig"]

DimpleConfig.register_for_auto_class()
