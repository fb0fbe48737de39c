"""transformers' own common test suites (ModelTesterMixin, ConfigTester, ProcessorTesterMixin) run on a tiny Dimple.

The mixins ship in the transformers source distribution, not in the wheel; `tests/upstream/fetch_transformers_tests.sh`
unpacks them for the installed version into `.upstream/transformers-tests/<version>/` (an install step: the tests
never touch the network). Without that folder this module is skipped.

The sdist carries the common test files but not their helper modules (`tests/generation/test_utils.py`,
`tests/exporters/test_export.py`, `tests/utils/test_configuration_utils.py`, `utils/fetch_hub_objects_for_ci.py`).
Minimal stand-ins are installed below: the generation and export mixins become empty (their tests are therefore not
run), `config_common_kwargs` is only read for non-composite configs, and hub fixture URLs map to a local picture.

Every upstream test that does not apply to Dimple is listed in `SKIPPED_MODEL_TESTS` / `SKIPPED_PROCESSOR_TESTS`
with its reason.
"""

import functools
import sys
import tempfile
import types
import unittest
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

import dimple
from dimple.image_processing_dimple import DimpleImageProcessor
from dimple.tiny.build import build_tiny_tokenizer

UPSTREAM = Path(__file__).resolve().parents[1] / ".upstream" / "transformers-tests" / transformers.__version__
PACKAGE = "transformers_common_tests"

if not (UPSTREAM / "test_modeling_common.py").is_file():
    pytest.skip(
        f"transformers {transformers.__version__}'s common test files are not in {UPSTREAM}; fetch them with "
        "tests/upstream/fetch_transformers_tests.sh",
        allow_module_level=True,
    )


class _StandInGenerationTesterMixin:
    """Stand-in for tests/generation/test_utils.py, which the source distribution does not ship."""


class _StandInExportTesterMixin:
    """Stand-in for tests/exporters/test_export.py, which the source distribution does not ship."""


@functools.cache
def _local_picture() -> str:
    """A local PNG that replaces the hub-hosted sample images the processor tests would download."""
    path = Path(tempfile.mkdtemp(prefix="dimple-conformance-")) / "sample.png"
    Image.new("RGB", (96, 64), (200, 60, 30)).save(path)
    return str(path)


def _url_to_local_path(url: str) -> str:
    """Hub sample images -> a local picture; other media stay URLs (Dimple's processor takes no video or audio)."""
    return _local_picture() if url.endswith((".png", ".jpg", ".jpeg")) else url


def _install_upstream_package() -> None:
    """Make the fetched folder importable as a package (its modules use relative imports) with the stand-ins."""
    modules = {
        PACKAGE: {"__path__": [str(UPSTREAM)]},
        f"{PACKAGE}.generation": {"__path__": []},
        f"{PACKAGE}.generation.test_utils": {"GenerationTesterMixin": _StandInGenerationTesterMixin},
        f"{PACKAGE}.exporters": {"__path__": []},
        f"{PACKAGE}.exporters.test_export": {"ExportTesterMixin": _StandInExportTesterMixin},
        f"{PACKAGE}.utils": {"__path__": []},
        f"{PACKAGE}.utils.test_configuration_utils": {"config_common_kwargs": {}},
        "fetch_hub_objects_for_ci": {"url_to_local_path": _url_to_local_path},
    }
    for name, attributes in modules.items():
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__dict__.update(attributes)
            sys.modules[name] = module


_install_upstream_package()
from transformers_common_tests.test_configuration_common import ConfigTester  # noqa: E402
from transformers_common_tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor  # noqa: E402
from transformers_common_tests.test_processing_common import ProcessorTesterMixin  # noqa: E402


class DimpleModelTester:
    """Tiny configs and inputs in the mixins' protocol: a batch of two prompts, each with one 56x56 image.

    With `images=False` the prompts are text only: for the mixin tests that carry only `input_ids` into the model.
    Special tokens sit between 10 and 15: the mixins pad batches with random ids below 5 and clamp ids into a
    vocabulary shrunk by 15.
    """

    def __init__(self, parent: unittest.TestCase, images: bool = True, batch_size: int = 2) -> None:
        self.parent = parent
        self.images = images
        self.batch_size = batch_size
        self.is_training = True
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.vocab_size = 99
        self.grid = (1, 4, 4)
        self.image_tokens = 4  # 4x4 patches merged 2x2
        self.seq_length = 16
        ids = dict(pad_token_id=0, eos_token_id=0, mask_token_id=10, image_token_id=11, video_token_id=12,
                   vision_start_token_id=13, vision_end_token_id=14, vision_token_id=15)
        self.special_ids = ids
        self.config_kwargs = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=37,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=2,
            max_position_embeddings=512,
            mrope_section=[1, 1, 2],
            vision_config=dict(
                depth=2, hidden_size=32, intermediate_size=24, num_heads=2, out_hidden_size=self.hidden_size,
                window_size=28, fullatt_block_indexes=[1], initializer_range=0.02,
            ),
            initializer_range=0.02,
            **ids,
        )

    def get_config(self) -> dimple.DimpleConfig:
        return dimple.DimpleConfig(**self.config_kwargs)

    def prepare_config_and_inputs_for_common(self) -> tuple[dimple.DimpleConfig, dict[str, torch.Tensor]]:
        config = self.get_config()
        text = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 16) + 16  # no special token
        if not self.images:
            return config, {"input_ids": text, "attention_mask": torch.ones_like(text)}
        text[:, 1] = self.special_ids["vision_start_token_id"]
        text[:, 2 : 2 + self.image_tokens] = self.special_ids["image_token_id"]
        text[:, 2 + self.image_tokens] = self.special_ids["vision_end_token_id"]
        patches = self.batch_size * self.grid[0] * self.grid[1] * self.grid[2]
        inputs = {
            "input_ids": text,
            "attention_mask": torch.ones_like(text),
            "pixel_values": floats_tensor([patches, 3 * 2 * 14 * 14]),
            "image_grid_thw": torch.tensor([self.grid] * self.batch_size),
        }
        return config, inputs


STRICT_LOADING = (
    "loads a checkpoint that lacks weights on purpose; Dimple's from_pretrained refuses incomplete checkpoints unless "
    "strict=False (tests/test_safe_loading.py)"
)
SKIPPED_MODEL_TESTS: dict[str, str] = {
    "test_correct_missing_keys": STRICT_LOADING,
    "test_model_weights_reload_no_missing_tied_weights": STRICT_LOADING,
    "test_model_forward_default_config_values": (
        "drops pad/eos ids so the released 7B defaults (pad 151643) apply to a 99-token test vocabulary; Dimple's "
        "config refuses special ids outside the vocabulary"
    ),
    "test_resize_tokens_embeddings": (
        "after resizing (which passes), builds a model with a 4-token vocabulary, too small for Dimple's 8 "
        "special-token ids, which the config refuses"
    ),
    "test_sliding_window_mask": (
        "Dimple refuses use_sliding_window=True at config time (a bidirectional decoder trained without a window; "
        "tests/test_standard_api.py)"
    ),
}


class DimpleModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (dimple.DimpleModel,)
    _is_composite = True
    test_resize_embeddings = True

    def setUp(self) -> None:
        # The eager/sdpa comparison extends only `input_ids` to its batch of 7 (pixel_values are not carried).
        text_only = self._testMethodName.startswith("test_eager_matches_sdpa_inference")
        self.model_tester = DimpleModelTester(self, images=not text_only)
        self.config_tester = ConfigTester(self, config_class=dimple.DimpleConfig, has_text_modality=False)

    def _prepare_for_class(self, inputs_dict: dict, model_class: type, return_labels: bool = False) -> dict:
        """Labels as the mixin gives image-text-to-text and causal-LM classes: DimpleModel is registered for those
        Auto classes at import, not listed in the static name tables the mixin reads."""
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:
            inputs_dict["labels"] = torch.zeros_like(inputs_dict["input_ids"])
        return inputs_dict

    def test_config(self) -> None:
        self.config_tester.run_common_tests()

    @property
    def all_generative_model_classes(self) -> tuple:
        """Dimple's `generate` is discrete-diffusion decoding; the autoregressive generation suite does not apply."""
        return ()


class DimpleProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = dimple.DimpleProcessor

    @classmethod
    def _setup_tokenizer(cls):
        return build_tiny_tokenizer()

    @classmethod
    def _setup_image_processor(cls):
        return DimpleImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64)

    @classmethod
    def _setup_test_attributes(cls, processor: dimple.DimpleProcessor) -> None:
        """The placeholder the mixin writes into test prompts (5.12's mixin leaves this hook to the test class)."""
        cls.image_token = processor.image_token


AUTO_MAP_ROUND_TRIP = (
    "DimpleProcessor is registered for AutoProcessor as remote code: save_pretrained adds `auto_map` to the saved "
    "instance's to_dict() and from_pretrained drops it from the loaded one's"
)
SKIPPED_PROCESSOR_TESTS: dict[str, str] = {
    "test_processor_from_and_save_pretrained": AUTO_MAP_ROUND_TRIP,
    "test_processor_from_and_save_pretrained_as_nested_dict": AUTO_MAP_ROUND_TRIP,
}


def _apply_skips(test_class: type, reasons: dict[str, str]) -> None:
    for name, reason in reasons.items():
        setattr(test_class, name, unittest.skip(reason)(getattr(test_class, name)))


# Older mixins (5.12) check one pixel_values row per image; Qwen2-VL-style processors give one row per patch.
if "self.assertEqual(len(out_dict[input_name]), batch_size)" in (UPSTREAM / "test_processing_common.py").read_text():
    PATCH_ROWS = (
        "this release's version expects one pixel_values row per image; Qwen2-VL-style processors return one row "
        "per patch (newer releases check this correctly, and it passes there)"
    )
    SKIPPED_PROCESSOR_TESTS.update(
        {"test_apply_chat_template_image_0": PATCH_ROWS, "test_apply_chat_template_image_1": PATCH_ROWS}
    )

_apply_skips(DimpleModelTest, SKIPPED_MODEL_TESTS)
_apply_skips(DimpleProcessorTest, SKIPPED_PROCESSOR_TESTS)
