"""Assemble a new Dimple from its parents: a Dream decoder and a Qwen2.5-VL vision tower, plus a fresh projector.

This is how Dimple-7B began (Dream-v0-Instruct-7B + the Qwen2.5-VL-7B-Instruct tower, then the stages of
`dimple train`). The parents are read from their files only: `config.json`, safetensors weights, tokenizer and
image-processor files; no parent's remote code is imported. The config is built from both configs (decoder sizes,
rope, special ids with `mask_token_id` from Dream; the tower's settings from Qwen2.5-VL), every decoder and tower
tensor is copied unchanged (Qwen2.5-VL checkpoints keep the tower under `visual.*` or, as transformers 5 nests it,
`model.visual.*`), and only the projector (`img_projector.*`: tower width -> decoder width -> decoder width) is
initialised. Tensors are streamed shard by shard with `safe_open`, so a 7B assembly holds at most one output shard
in memory. The folder is built under a temporary name beside `out` and renamed when complete.

Parents that cannot make a Dimple are refused with a message naming what differs: a Qwen2-VL tower (no window
attention), a vocabulary without `<|mask|>`, image-token ids that disagree between the tokenizer and the tower's
config, tensors with other names or shapes than the config implies.
"""

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic_write import fsync_folder
from ..configuration_dimple import DimpleConfig, DimpleVisionConfig
from ..generation_config_dimple import DimpleGenerationConfig
from ..image_processing_dimple import DimpleImageProcessor
from ..loading_dimple import PICKLE_WEIGHTS, summarise
from ..modeling_dimple import DimpleModel
from ..processing_dimple import DEFAULT_CHAT_TEMPLATE, DimpleProcessor
from ..remote_code import model_auto_map
from ..tiny.bundled import sync_remote_code
from ..tokenization_dimple import DimpleTokenizer

DEFAULT_SHARD_SIZE = 5 * 1024**3
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
DECODER_TYPES = ("dream", "qwen2")
VISION_TYPE = "qwen2_5_vl"
# Decoder fields taken from the decoder's config.json as they are (those it lacks keep DimpleConfig's defaults).
DECODER_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "attention_dropout", "max_window_layers", "pad_token_id", "bos_token_id", "eos_token_id",
)
VISION_FIELDS = (
    "depth", "hidden_size", "hidden_act", "intermediate_size", "num_heads", "in_channels", "patch_size",
    "spatial_merge_size", "temporal_patch_size", "tokens_per_second", "window_size", "out_hidden_size",
    "fullatt_block_indexes", "initializer_range",
)
# Config field -> the token it must name in the decoder's vocabulary; the vision parent's config has the first four.
VISION_TOKEN_IDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}
MASK_TOKEN = "<|mask|>"
# Qwen2.5-VL splits each head's rotary frequencies 2:3:3 over (time, height, width): [16, 24, 24] for head_dim 128.
MROPE_RATIO = (2, 3, 3)
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
PARENT_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*", "vocab.json",
                "merges.txt", "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json")


class AssembleError(ValueError):
    """The parents cannot make a Dimple, or the output folder cannot be written: the CLI prints it as one line."""


# --- Reading the parents ----------------------------------------------------------------------------------------


def parent_folder(name: str | os.PathLike, role: str) -> Path:
    """A local folder as it is; a Hub id (owner/name) downloaded with `huggingface_hub` (config, safetensors,
    tokenizer and preprocessor files only: no Python file is fetched)."""
    if Path(name).is_dir():
        return Path(name)
    if Path(name).exists() or not HUB_ID.fullmatch(str(name)):
        raise AssembleError(f"--{role} {name} is neither a folder nor a Hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name), allow_patterns=list(PARENT_FILES)))
    except (OSError, ValueError) as error:  # offline, unknown repo, gated repo: huggingface_hub's errors
        raise AssembleError(f"cannot download the {role} parent {name} from the Hub: {error}") from error


def read_config(folder: Path, role: str) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise AssembleError(f"cannot read the {role} parent's {path}: {error}") from error
    if not isinstance(config, dict):
        raise AssembleError(f"{path} is not a JSON object")
    return config


def tensor_files(folder: Path, role: str) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (through the index when there is one)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(file.name for pattern in PICKLE_WEIGHTS for file in folder.glob(pattern))
        found = f" (only pickle weights: {', '.join(pickles)}; convert them to safetensors)" if pickles else ""
        raise AssembleError(f"the {role} parent {folder} has no safetensors weights{found}")
    located = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            located.update(dict.fromkeys(handle.keys(), file))
    return located


def file_vocabulary(folder: Path) -> dict[str, int]:
    """Token -> id as the tokenizer files define them (tokenizer.json, else vocab.json plus the added tokens of
    tokenizer_config.json); read before any tokenizer class is built, because building one would add a missing
    `<|mask|>` as a new token instead of reporting it."""
    if (folder / "tokenizer.json").is_file():
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = dict(data["model"]["vocab"])
        vocab.update({token["content"]: token["id"] for token in data.get("added_tokens", [])})
        return vocab
    if not (folder / "vocab.json").is_file():
        raise AssembleError(f"the decoder parent {folder} has no tokenizer files (tokenizer.json or vocab.json)")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    config_path = folder / "tokenizer_config.json"
    added = {}
    if config_path.is_file():
        added = json.loads(config_path.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
    vocab.update({entry["content"]: int(index) for index, entry in added.items()})
    return vocab


# --- The config -------------------------------------------------------------------------------------------------


def check_decoder(config: dict[str, Any]) -> None:
    model_type = str(config.get("model_type", "")).lower()
    if model_type not in DECODER_TYPES:
        raise AssembleError(
            f"the decoder parent's model_type is {config.get('model_type')!r}; Dimple's decoder is a Dream "
            "(model_type 'Dream', a Qwen2 architecture) checkpoint"
        )
    if config.get("use_sliding_window"):
        raise AssembleError(
            "the decoder parent uses sliding-window attention; Dimple's decoder attends over the whole sequence"
        )
    scaling = rope_scaling(config)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise AssembleError(f"the decoder parent's rope scaling {scaling} is not supported by Dimple's M-RoPE")


def rope_scaling(config: dict[str, Any]) -> dict[str, Any] | None:
    scaling = config.get("rope_scaling")
    if scaling is None and isinstance(config.get("rope_parameters"), dict):
        scaling = {key: value for key, value in config["rope_parameters"].items() if key != "rope_theta"}
    return scaling


def vision_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The tower's settings from a Qwen2.5-VL config.json; a Qwen2-VL or other tower is refused by what differs."""
    model_type = config.get("model_type")
    vision = config.get("vision_config")
    if model_type == "qwen2_vl":
        raise AssembleError(
            "the vision parent is a Qwen2-VL checkpoint (model_type 'qwen2_vl'): its tower has LayerNorm, a GELU MLP "
            "and no window attention (no fullatt_block_indexes); Dimple's tower is Qwen2.5-VL's. Pass a Qwen2.5-VL "
            "checkpoint"
        )
    if model_type != VISION_TYPE or not isinstance(vision, dict):
        raise AssembleError(
            f"the vision parent's model_type is {model_type!r}; pass a Qwen2.5-VL checkpoint (model_type "
            f"{VISION_TYPE!r} with a vision_config)"
        )
    if "in_chans" in vision and "in_channels" not in vision:
        vision = {**vision, "in_channels": vision["in_chans"]}
    required = ("depth", "hidden_size", "out_hidden_size", "fullatt_block_indexes")
    missing = [name for name in required if name not in vision]
    if missing:
        raise AssembleError(
            f"the vision parent's vision_config lacks {', '.join(missing)}; it is not a Qwen2.5-VL tower"
        )
    return {name: vision[name] for name in VISION_FIELDS if name in vision}


def mrope_section(vision_parent: dict[str, Any], head_dim: int) -> list[int]:
    """The tower parent's M-RoPE split when it fits the decoder's head size, else Qwen2.5-VL's 2:3:3 ratio."""
    text = vision_parent.get("text_config") or {}
    for scaling in (vision_parent.get("rope_scaling"), text.get("rope_parameters"), text.get("rope_scaling")):
        if isinstance(scaling, dict) and scaling.get("mrope_section") and 2 * sum(scaling["mrope_section"]) == head_dim:
            return list(scaling["mrope_section"])
    unit, remainder = divmod(head_dim // 2, sum(MROPE_RATIO))
    if remainder or head_dim % 2:
        raise AssembleError(
            f"the decoder's head size {head_dim} cannot be split into Qwen2.5-VL's 2:3:3 M-RoPE sections; "
            "pick a decoder whose head size is a multiple of 16"
        )
    return [unit * share for share in MROPE_RATIO]


def special_token_ids(decoder: dict[str, Any], vision_parent: dict[str, Any], vocab: dict[str, int]) -> dict[str, int]:
    """The mask id from Dream's config (checked against its vocabulary) and the vision ids from the tokenizer,
    checked against the ids the tower's config was trained with."""
    if MASK_TOKEN not in vocab:
        raise AssembleError(
            f"the decoder parent's vocabulary has no {MASK_TOKEN} token: it is not a masked-diffusion (Dream) decoder"
        )
    ids = {"mask_token_id": vocab[MASK_TOKEN], "vision_token_id": vocab.get("<|vision_pad|>")}
    if decoder.get("mask_token_id") not in (None, ids["mask_token_id"]):
        raise AssembleError(
            f"the decoder's config says mask_token_id {decoder['mask_token_id']} but its tokenizer has {MASK_TOKEN} "
            f"at {ids['mask_token_id']}"
        )
    for field, token in VISION_TOKEN_IDS.items():
        if token not in vocab:
            raise AssembleError(f"the decoder parent's vocabulary has no {token} token, which Dimple's images need")
        ids[field] = vocab[token]
        if field in vision_parent and vision_parent[field] != vocab[token]:
            raise AssembleError(
                f"image-token ids differ: the vision parent's {field} is {vision_parent[field]} but the decoder's "
                f"tokenizer has {token} at {vocab[token]}; the parents must share Qwen2's vocabulary"
            )
    if ids["vision_token_id"] is None:
        ids.pop("vision_token_id")
    return ids


def dimple_config(
    decoder: dict[str, Any], vision_parent: dict[str, Any], vision: dict[str, Any], vocab: dict[str, int]
) -> DimpleConfig:
    """The Dimple config of a checked decoder config (`check_decoder`) and tower settings (`vision_settings`)."""
    values = {name: decoder[name] for name in DECODER_FIELDS if name in decoder}
    rope_parameters = decoder.get("rope_parameters") or {}
    values["rope_theta"] = decoder.get("rope_theta") or rope_parameters.get("rope_theta", 10000.0)
    head_dim = decoder["hidden_size"] // decoder["num_attention_heads"]
    config = DimpleConfig(
        **values,
        **special_token_ids(decoder, vision_parent, vocab),
        mrope_section=mrope_section(vision_parent, head_dim),
        vision_config=DimpleVisionConfig(**vision),
        full_attn_mask=True,
        use_cache=False,
        tie_word_embeddings=False,
    )
    config.architectures = [DimpleModel.__name__]
    config.auto_map = model_auto_map()
    config.dtype = getattr(torch, str(decoder.get("dtype") or decoder.get("torch_dtype") or "float32"))
    if len(vocab) > config.vocab_size:
        raise AssembleError(
            f"the decoder's tokenizer has {len(vocab)} tokens but its config only {config.vocab_size} embedding rows"
        )
    return config


# --- The tensors ------------------------------------------------------------------------------------------------


class Planned:
    """One output tensor: read from `file` under `source`, or (the projector) given as `tensor`."""

    def __init__(self, target: str, file: Path | None, source: str | None, shape: list[int], nbytes: int,
                 tensor: torch.Tensor | None = None) -> None:
        self.target, self.file, self.source, self.shape, self.nbytes, self.tensor = (
            target, file, source, shape, nbytes, tensor
        )


def expected_shapes(config: DimpleConfig) -> dict[str, list[int]]:
    """Every weight a Dimple of this config has, with its shape; built on the meta device (no memory)."""
    with torch.device("meta"):
        model = DimpleModel(config)
    return {name: list(tensor.shape) for name, tensor in model.state_dict().items()}


def parent_tensors(
    decoder: dict[str, Path], vision: dict[str, Path], tied_head: bool
) -> tuple[dict[str, tuple[Path, str]], list[str]]:
    """Output name -> (file, source name) for every tensor the parents give, and the names that fit nowhere."""
    sources: dict[str, tuple[Path, str]] = {}
    strays = []
    for name, file in decoder.items():
        if name.startswith("model.") or name == "lm_head.weight":
            sources[name] = (file, name)
        else:
            strays.append(f"decoder:{name}")
    if "lm_head.weight" not in sources and tied_head and "model.embed_tokens.weight" in sources:
        sources["lm_head.weight"] = sources["model.embed_tokens.weight"]  # a tied head becomes its own copy
    for name, file in vision.items():
        if name.startswith("visual."):
            sources[name] = (file, name)
        elif name.startswith("model.visual."):
            sources[name.removeprefix("model.")] = (file, name)
    return sources, strays


def tensor_plan(config: DimpleConfig, decoder_config: dict[str, Any], decoder: dict[str, Path],
                vision: dict[str, Path]) -> list[Planned]:
    """The copied tensors, checked name by name and shape by shape against what the config implies."""
    expected = {name: shape for name, shape in expected_shapes(config).items() if not name.startswith("img_projector.")}
    sources, strays = parent_tensors(decoder, vision, bool(decoder_config.get("tie_word_embeddings")))
    strays += [name for name in sources if name not in expected]  # e.g. more layers than the config has
    missing = sorted(set(expected) - set(sources))
    if missing or strays:
        problems = ([f"no parent tensor for {len(missing)} weights ({summarise(missing)})"] if missing else []) + (
            [f"{len(strays)} parent tensors fit no Dimple weight ({summarise(strays)})"] if strays else []
        )
        raise AssembleError(f"the parents do not match a Dimple of their configs: {'; '.join(problems)}")
    plan = []
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}
        for target in sorted(expected):
            file, source = sources[target]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, framework="pt"))
            piece = handles[file].get_slice(source)
            shape = list(piece.get_shape())
            if shape != expected[target]:
                raise AssembleError(
                    f"{source} in {file.name} has shape {shape}, but the parents' configs give {target} the shape "
                    f"{expected[target]}"
                )
            count = 1
            for size in shape:
                count *= size
            plan.append(Planned(target, file, source, shape, count * DTYPE_BYTES[piece.get_dtype()]))
    return plan


def projector_tensors(config: DimpleConfig, seed: int) -> list[Planned]:
    """The new projector: weights ~ N(0, initializer_range) from a seeded generator, zero biases, in the model
    dtype (transformers' own initialisation of a linear layer, made reproducible)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "img_projector.linear_1": (config.hidden_size, config.vision_config.out_hidden_size),
        "img_projector.linear_2": (config.hidden_size, config.hidden_size),
    }
    planned = []
    for prefix, shape in shapes.items():
        weight = torch.randn(shape, generator=generator) * config.initializer_range
        for name, tensor in ((f"{prefix}.weight", weight), (f"{prefix}.bias", torch.zeros(shape[0]))):
            tensor = tensor.to(config.dtype)
            nbytes = tensor.numel() * tensor.element_size()
            planned.append(Planned(name, None, None, list(tensor.shape), nbytes, tensor))
    return planned


def shards(plan: list[Planned], limit: int) -> list[list[Planned]]:
    """Consecutive groups of at most `limit` bytes (a larger tensor gets a shard of its own)."""
    groups: list[list[Planned]] = [[]]
    size = 0
    for entry in plan:
        if groups[-1] and size + entry.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    return groups


def shard_tensors(group: list[Planned]) -> Iterator[tuple[str, torch.Tensor]]:
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}
        for entry in group:
            if entry.tensor is not None:
                yield entry.target, entry.tensor
                continue
            if entry.file not in handles:
                handles[entry.file] = stack.enter_context(safe_open(entry.file, framework="pt"))
            yield entry.target, handles[entry.file].get_tensor(entry.source)


def write_weights(folder: Path, plan: list[Planned], limit: int) -> None:
    """`model.safetensors`, or numbered shards plus `model.safetensors.index.json`; one shard in memory at a time."""
    groups = shards(plan, limit)
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        name = "model.safetensors" if len(groups) == 1 else f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file(dict(shard_tensors(group)), str(folder / name), metadata={"format": "pt"})
        weight_map.update({entry.target: name for entry in group})
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(entry.nbytes for entry in plan)}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# --- Processor and folder ---------------------------------------------------------------------------------------


def build_processor(decoder_folder: Path, vision_folder: Path) -> DimpleProcessor:
    """Dream's tokenizer and Qwen2.5-VL's image processor (pixel budget, normalisation) with Dimple's chat template;
    read with our classes, whatever classes the parents' files name."""
    if not (vision_folder / "preprocessor_config.json").is_file():
        raise AssembleError(f"the vision parent {vision_folder} has no preprocessor_config.json (its image processor)")
    tokenizer = DimpleTokenizer.from_pretrained(decoder_folder, padding_side="left")
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE  # Dream's own template would win for tokenizer-only chats
    image_processor = DimpleImageProcessor.from_pretrained(vision_folder)
    return DimpleProcessor(image_processor=image_processor, tokenizer=tokenizer)


def publish_new_folder(out: Path, write) -> Path:
    """Build the checkpoint in a temporary folder beside `out`, sync it, and rename it to `out` in one step."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AssembleError(f"--out {out} exists and is not an empty folder; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        write(staging)
        for path in staging.iterdir():
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
        os.chmod(staging, 0o755)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_folder(out.parent)
    return out


def assemble(
    decoder: str | os.PathLike,
    vision: str | os.PathLike,
    out: str | os.PathLike,
    seed: int = 0,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
) -> Path:
    """Write a new Dimple checkpoint to `out` from a Dream decoder and a Qwen2.5-VL tower (folders or Hub ids).

    The result loads with `AutoModel`/`AutoProcessor.from_pretrained(out, trust_remote_code=True)` (it carries this
    package's remote code) and is ready for `dimple train --stage align`. `seed` fixes the projector's
    initialisation; `max_shard_size` (bytes) splits the weights into safetensors shards.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AssembleError(f"--out {out} exists and is not an empty folder; choose a new folder")
    decoder_folder, vision_folder = parent_folder(decoder, "decoder"), parent_folder(vision, "vision")
    decoder_config, vision_config = read_config(decoder_folder, "decoder"), read_config(vision_folder, "vision")
    check_decoder(decoder_config)
    vision = vision_settings(vision_config)
    config = dimple_config(decoder_config, vision_config, vision, file_vocabulary(decoder_folder))
    plan = tensor_plan(config, decoder_config, tensor_files(decoder_folder, "decoder"),
                       tensor_files(vision_folder, "vision"))
    plan += projector_tensors(config, seed)
    processor = build_processor(decoder_folder, vision_folder)

    def write(staging: Path) -> None:
        config.save_pretrained(staging)
        DimpleGenerationConfig.from_model_config(config).save_pretrained(staging)
        processor.save_pretrained(staging)
        sync_remote_code(staging)
        write_weights(staging, plan, max_shard_size)

    return publish_new_folder(out, write)
