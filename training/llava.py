"""LLaVA / LLaVA-NeXT training data as chat samples for `DimpleSFTCollator`.

The format (LLaVA's `llava_v1_5_mix665k.json`, LLaVA-NeXT's `llava_next_779k.json`, the LCS-558K alignment set): a
JSON list, or JSONL with one object per line, of records ``{"id": ..., "image": "coco/x.jpg" | [...] (optional),
"conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}``.
Image paths are relative to an image folder. Each ``<image>`` placeholder of a human turn becomes one image item at
that place, in order; a record with images but no placeholder gets them at the start of its first human turn (as
LLaVA's own loader does). Multi-turn records and records without images are ordinary samples.

Missing image files are found when the data is opened (one `stat` per file), not halfway through a run: the first
one is an error naming the record and the path, or, with ``missing_images="skip"``, every record that lacks one is
left out and counted (`skipped`).
"""

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..image_processing_dimple import load_image, readable_image_errors

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MISSING_IMAGE_POLICIES = ("error", "skip")


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON list or a JSONL file (by content, whatever the suffix); a broken line is named."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"training data {path} not found; pass a LLaVA-format .json or .jsonl file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error})") from error
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path} line {number} is not a JSON object ({error})") from error
    if not records or not all(isinstance(record, dict) for record in records):
        raise ValueError(f"{path} must hold a non-empty list of LLaVA records (JSON objects)")
    return records


def record_name(record: Mapping[str, Any], index: int) -> str:
    return f"record {index} (id {record['id']!r})" if "id" in record else f"record {index}"


def image_files(record: Mapping[str, Any], folder: Path | None, name: str) -> list[Path]:
    """The record's image paths (none, one, or a list) resolved against the image folder."""
    images = record.get("image", record.get("images"))
    if images is None:
        return []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(image, str) and image for image in images):
        raise ValueError(f"{name}: 'image' must be a file name or a list of file names, got {images!r}")
    if folder is None:
        raise ValueError(f"{name} has images but no image folder was given; pass --image-folder")
    return [folder / image for image in images]


def check_conversations(record: Mapping[str, Any], name: str, image_count: int) -> list[tuple[str, str]]:
    """(role, text) turns: known speakers, human and gpt alternating, at least one answer, placeholders matching."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{name} has no 'conversations' list")
    pairs = []
    for turn in turns:
        if not isinstance(turn, Mapping) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise ValueError(
                f"{name}: each turn needs 'from' (one of {', '.join(ROLES)}) and a text 'value', got {turn!r}"
            )
        pairs.append((ROLES[turn["from"]], turn["value"]))
    dialogue = pairs[1:] if pairs[0][0] == "system" else pairs
    if [role for role, _ in dialogue] != ["user", "assistant"] * (len(dialogue) // 2) or len(dialogue) % 2:
        raise ValueError(f"{name}: turns must alternate human, gpt, human, gpt, ... and end with a gpt answer")
    placeholders = sum(text.count(IMAGE_PLACEHOLDER) for role, text in dialogue if role == "user")
    if placeholders not in (0, image_count):
        raise ValueError(f"{name} has {image_count} images but {placeholders} {IMAGE_PLACEHOLDER} placeholders")
    return pairs


def user_content(text: str, images: list, leading: list) -> list[dict[str, Any]]:
    """A human turn's text with each placeholder replaced by the next image (taken from `images`)."""
    content = [{"type": "image", "image": image} for image in leading]
    for number, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if number:
            content.append({"type": "image", "image": images.pop(0)})
        piece = piece.strip("\n")  # "<image>\nQuestion": the chat template puts the text right after the image
        if piece:
            content.append({"type": "text", "text": piece})
    return content


def chat_messages(pairs: list[tuple[str, str]], images: list) -> list[dict[str, Any]]:
    """Chat-template messages; images with no placeholder anywhere go first in the first human turn."""
    images = list(images)
    placed = any(IMAGE_PLACEHOLDER in text for role, text in pairs if role == "user")
    leading, messages = ([] if placed else images), []
    for role, text in pairs:
        if role == "user":
            messages.append({"role": role, "content": user_content(text, images, leading)})
            leading = []
        else:
            messages.append({"role": role, "content": text})
    return messages


class LlavaDataset(Dataset):
    """A LLaVA-format file as a map-style dataset of ``{"messages": [...]}`` samples, pictures read on access.

    Args:
        data_file: a ``.json`` list or ``.jsonl`` file of LLaVA records.
        image_folder: the folder the records' image paths are relative to (needed when any record has images).
        missing_images: ``"error"`` (default) raises on the first record whose image file does not exist;
            ``"skip"`` leaves such records out and counts them in `skipped`.
    """

    def __init__(
        self, data_file: str | os.PathLike, image_folder: str | os.PathLike | None = None, missing_images: str = "error"
    ) -> None:
        if missing_images not in MISSING_IMAGE_POLICIES:
            raise ValueError(f"missing_images must be one of {MISSING_IMAGE_POLICIES}, got {missing_images!r}")
        folder = Path(image_folder) if image_folder is not None else None
        if folder is not None and not folder.is_dir():
            raise ValueError(f"image folder {folder} does not exist")
        self.samples: list[tuple[list[tuple[str, str]], list[Path]]] = []
        self.skipped = 0
        for index, record in enumerate(read_records(data_file)):
            name = record_name(record, index)
            files = image_files(record, folder, name)
            pairs = check_conversations(record, name, len(files))
            absent = [file for file in files if not file.is_file()]
            if absent and missing_images == "error":
                raise ValueError(
                    f"{name}: image {absent[0]} not found; fix --image-folder, or skip such records with "
                    "--skip-missing-images"
                )
            if absent:
                self.skipped += 1
                continue
            self.samples.append((pairs, files))
        if not self.samples:
            raise ValueError(f"{data_file}: no usable record (all {self.skipped} lack an image file)")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pairs, files = self.samples[index]
        images = []
        for file in files:
            try:
                with readable_image_errors():
                    images.append(load_image(file))
            except (OSError, ValueError) as error:
                raise ValueError(f"cannot read image {file}: {error}") from error
        return {"messages": chat_messages(pairs, images)}
