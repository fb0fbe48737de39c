"""Tokenizer for Dimple.

Dimple uses the Qwen2.5 byte-level BPE vocabulary (via Dream) plus Dream's ``<|mask|>`` token, so the
tokenizer is Qwen2's. The class only exists because the released ``tokenizer_config.json`` names
``tokenization_dimple.DimpleTokenizer`` (``tokenizer_class`` and ``auto_map``): ``AutoTokenizer`` with
``trust_remote_code=True`` must find a class under that name.
"""

from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer


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


DimpleTokenizer.register_for_auto_class()
