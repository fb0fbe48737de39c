"""Tokenizer for Dimple.

Dimple uses the Qwen2.5 byte-level BPE vocabulary (via Dream) plus Dream's ``<|mask|>`` token, so the
tokenizer is Qwen2's. The class only exists because the released ``tokenizer_config.json`` names
``tokenization_dimple.DimpleTokenizer`` (``tokenizer_class`` and ``auto_map``): ``AutoTokenizer`` with
``trust_remote_code=True`` must find a class under that name.
"""

import json
from typing import Any

from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer


def broken_json_files(files: dict[str, Any]) -> list[str]:
    """The resolved tokenizer files (tokenizer.json, tokenizer_config.json, ...) that are not valid JSON."""
    broken = []
    for path in files.values():
        if not isinstance(path, str) or not path.endswith(".json"):
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
        except (ValueError, OSError):
            broken.append(path)
    return broken


class DimpleTokenizer(Qwen2Tokenizer):
    """Qwen2 BPE tokenizer with Dimple's defaults.

    * ``mask_token`` defaults to ``"<|mask|>"``: the diffusion decoder reads ``tokenizer.mask_token_id`` to
      build the all-masked response canvas.
    * ``padding_side`` defaults to ``"left"``: prompts of a batch must end at the same column so the masked
      response block can be appended after them. An explicit ``padding_side`` (e.g. from a saved
      ``tokenizer_config.json``) still wins here; ``DimpleProcessor`` forces ``"left"`` regardless.
    """

    padding_side = "left"

    def __init__(self, *args, mask_token: str = "<|mask|>", **kwargs) -> None:
        super().__init__(*args, mask_token=mask_token, **kwargs)

    @classmethod
    def _from_pretrained(cls, resolved_vocab_files: dict[str, Any], *args, **kwargs):
        """transformers' loader, with a truncated or corrupt tokenizer file named in the error (the JSON parser's
        message says only "line 221 column 1 (char 4096)")."""
        try:
            return super()._from_pretrained(resolved_vocab_files, *args, **kwargs)
        except json.JSONDecodeError as error:
            broken = broken_json_files(resolved_vocab_files)
            if not broken:
                raise
            raise ValueError(
                f"{', '.join(broken)} is not valid JSON ({error}): the file is truncated or corrupt; re-download it."
            ) from error


DimpleTokenizer.register_for_auto_class()
