"""Strict loading: a checkpoint loads completely and finitely, or not at all.

transformers' `from_pretrained` loads whatever keys match and leaves the rest randomly initialised, mentioning it
only in a load report: a checkpoint without `lm_head.weight` answers with a random head, a config whose
`num_hidden_layers` disagrees with the weights loads fewer layers, and NaN weights decode to '!!!!' without a word.
`DimplePreTrainedModel.from_pretrained` calls these checks after loading; `strict=False` turns the refusals into
warnings for deliberate partial loads (e.g. training a new head).
"""

import math
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

SHOWN_KEYS = 6
# Weight files, by how they are read: safetensors hold tensors only; unpickling can run code.
SAFETENSORS_WEIGHTS = ("*.safetensors", "*.safetensors.index.json")
PICKLE_WEIGHTS = ("*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt")


def summarise(keys: Iterable[str]) -> str:
    """The first few keys, sorted, and how many more: a message stays one readable line."""
    ordered = sorted(keys)
    shown = ", ".join(ordered[:SHOWN_KEYS])
    return shown + (f" and {len(ordered) - SHOWN_KEYS} more" if len(ordered) > SHOWN_KEYS else "")


def loading_problems(info: dict) -> list[str]:
    """What transformers' loading info says went wrong, one phrase per kind of problem (empty when clean)."""
    problems = []
    if info.get("missing_keys"):
        problems.append(
            f"the checkpoint has no weights for {len(info['missing_keys'])} parameters of the model "
            f"({summarise(info['missing_keys'])}), which would stay randomly initialised"
        )
    if info.get("unexpected_keys"):
        problems.append(
            f"the checkpoint holds {len(info['unexpected_keys'])} weights the model has no place for "
            f"({summarise(info['unexpected_keys'])})"
        )
    if info.get("mismatched_keys"):
        names = [entry[0] if isinstance(entry, tuple) else str(entry) for entry in info["mismatched_keys"]]
        problems.append(f"{len(names)} weights have another shape than the config says ({summarise(names)})")
    if info.get("error_msgs"):
        problems.append("loading reported: " + "; ".join(str(message) for message in info["error_msgs"][:3]))
    return problems


def check_loading_info(source: str | os.PathLike | None, info: dict, strict: bool) -> None:
    """Refuse (or, with `strict=False`, warn about) a load whose keys or shapes disagree with the config."""
    problems = loading_problems(info)
    if problems:
        refuse_or_warn(
            f"Loading {source}: {'; '.join(problems)}. config.json and the weights disagree (e.g. num_hidden_layers, "
            "vocab_size) or the checkpoint is incomplete; fix config.json or re-download the weights",
            ", or pass strict=False for a deliberate partial load (e.g. training a new head).",
            strict,
        )


def refuse_or_warn(message: str, strict_hint: str, strict: bool) -> None:
    """A loading problem: an error naming the `strict=False` way out, or with `strict=False` a warning."""
    if strict:
        raise ValueError(message + strict_hint)
    logger.warning(message + " (loaded anyway: strict=False).")


def local_values(parameter: torch.Tensor) -> torch.Tensor | None:
    """The values this process holds for a parameter (its shard under tensor parallelism); None when they are not in
    memory (meta/offloaded to disk) or quantized (integer storage, or a tensor subclass such as torchao's whose
    reductions are not defined)."""
    values = (parameter.to_local() if hasattr(parameter, "to_local") else parameter).detach()
    if values.device.type == "meta" or not values.is_floating_point() or type(values) is not torch.Tensor:
        return None
    return values


def nonfinite_weights(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers holding NaN or inf: one float32 sum each, no copy of the weights (a sum is
    non-finite when an entry is; float32 cannot overflow on real weights)."""
    names = []
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        values = local_values(tensor)
        if values is not None and values.numel() and not math.isfinite(float(values.sum(dtype=torch.float32))):
            names.append(name)
    return names


def check_finite_weights(source: str | os.PathLike | None, model: nn.Module, strict: bool) -> None:
    """NaN/inf weights are an error (a corrupt or badly converted checkpoint can only decode garbage); with
    `strict=False`, a warning naming them."""
    names = nonfinite_weights(model)
    if names:
        refuse_or_warn(
            f"Loading {source}: {len(names)} weight tensors hold NaN or inf values ({summarise(names)}); the "
            "checkpoint is corrupt or was converted to a dtype too narrow for it. Re-download or re-convert it",
            " (strict=False loads it anyway, e.g. to inspect it).",
            strict,
        )


def refuse_pickle_only_folder(path: str | os.PathLike | None, subfolder: str) -> None:
    """A local checkpoint folder without safetensors but with pickle weights gets a message naming the opt-in."""
    if path is None or not Path(path, subfolder).is_dir():
        return
    folder = Path(path, subfolder)
    if any(next(folder.glob(pattern), None) for pattern in SAFETENSORS_WEIGHTS):
        return
    pickles = sorted(file.name for pattern in PICKLE_WEIGHTS for file in folder.glob(pattern))
    if pickles:
        raise ValueError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); unpickling can run arbitrary code, so Dimple "
            "loads safetensors only. Convert the weights to safetensors, or, for a source you trust, opt in with "
            "from_pretrained(..., use_safetensors=False)."
        )
