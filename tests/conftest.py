"""Shared pytest fixtures. Each group is used by the test modules named in its header."""

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from transformers import BatchFeature
from transformers.dynamic_module_utils import get_relative_import_files

from isolated import run_without_dimple
from prompts import encode, picture

from dimple.processing_dimple import DEFAULT_CHAT_TEMPLATE, DimpleProcessor
from dimple.tiny.build import (
    SPECIAL_TOKENS,
    build_tiny_model,
    build_tiny_processor,
    build_tiny_tokenizer,
    tiny_vocab_and_merges,
)
from dimple.tokenization_dimple import DimpleTokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


class RootIsNotATestPackage:
    """Collect the repository root as a plain folder, not as a test package.

    pytest imports the `__init__.py` of every package on the way to a test, under the folder's name. The root's
    `__init__.py` is the `dimple` package itself, whose relative imports resolve only when the checkout folder happens
    to be a valid module name: in a clone named "Dimple-7B" or "dimple-hf" every test errored at setup. A plugin
    registered here is global, so it also sees the root, which lies above this conftest.
    """

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path: Path, parent: pytest.Collector) -> pytest.Collector | None:
        return pytest.Dir.from_parent(parent, path=path) if path == REPO_ROOT else None


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(RootIsNotATestPackage(), "dimple-root-is-not-a-test-package")


# ---------------------------------------------------------------------------------------------------------
# A tiny random Dimple, its processor and prompts for it, built once per test module (the generation_*, decoding
# modes, structure priors, compile, compat, image loading, processor, standard API, trust and safe loading tests)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor() -> DimpleProcessor:
    """The tiny processor (min_pixels 56*56, max_pixels 28*28*64); a test that changes it must undo the change."""
    return build_tiny_processor()


@pytest.fixture(scope="module")
def model(processor: DimpleProcessor):
    """The tiny random Dimple, shared by a module: a test that changes its weights builds its own."""
    return build_tiny_model(processor)


@pytest.fixture(scope="module")
def padded_batch(processor: DimpleProcessor) -> BatchFeature:
    """Two text prompts of different lengths: row 0 is left-padded."""
    return encode(processor, ["Hi.", "A much longer prompt about the cat."])


@pytest.fixture(scope="module")
def image_inputs(processor: DimpleProcessor) -> BatchFeature:
    """One prompt with one 56x84 picture (6 image tokens)."""
    return encode(processor, [("Describe it.", [picture(56, 84)])])


@pytest.fixture
def no_forward(model) -> Iterator[None]:
    """Fails the test if the model runs a forward pass during it: bad input is refused before any compute."""
    calls = []
    handle = model.register_forward_pre_hook(lambda *args: calls.append(1))
    yield
    handle.remove()
    assert not calls, "the error must come before any forward pass"


# ---------------------------------------------------------------------------------------------------------
# Tokenizer, image-file, released-layout and fresh-interpreter fixtures (the tokenizer, processor and install-code
# tests)
# ---------------------------------------------------------------------------------------------------------

# Remote-code files a processor folder needs: the processor, image-processor and tokenizer modules and the modules
# they import relatively, found as transformers finds them.
PROCESSOR_ENTRY_FILES = ("processing_dimple.py", "image_processing_dimple.py", "tokenization_dimple.py")
PROCESSOR_CODE_FILES = tuple(sorted({
    Path(path).name
    for entry in PROCESSOR_ENTRY_FILES
    for path in (REPO_ROOT / entry, *get_relative_import_files(str(REPO_ROOT / entry)))
}))


@pytest.fixture
def tiny_tokenizer() -> DimpleTokenizer:
    """A fresh tiny tokenizer (tests may change its padding side)."""
    return build_tiny_tokenizer()


@pytest.fixture
def image_file(tmp_path: Path) -> Callable[..., Path]:
    """Factory ``image_file(name, width, height, seed=0)``: a `picture` saved as a real file.

    The format follows the suffix of ``name`` (``.png`` or ``.jpg``).
    """

    def write(name: str, width: int, height: int, seed: int = 0) -> Path:
        path = tmp_path / "images" / name
        path.parent.mkdir(exist_ok=True)
        picture(width, height, seed).save(path)
        return path

    return write


@pytest.fixture
def released_layout_dir(tmp_path: Path) -> Callable[..., Path]:
    """Factory ``released_layout_dir(min_pixels, max_pixels)`` for a folder laid out like the released repo.

    transformers 4.46 layout: ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json`` (slow tokenizer,
    ``added_tokens_decoder``, ``padding_side="right"`` as training saved it), a ``preprocessor_config.json``
    with ``min_pixels``/``max_pixels``, a legacy ``chat_template.json`` and our ``.py`` files copied in. The
    vocabulary is the tiny one, so a correct load reproduces ``build_tiny_processor`` exactly.
    """

    def write(min_pixels: int, max_pixels: int) -> Path:
        folder = tmp_path / "released"
        folder.mkdir()
        vocab, merges = tiny_vocab_and_merges()
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges_text = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges)
        (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
        added = {
            str(len(vocab) + offset): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for offset, token in enumerate(SPECIAL_TOKENS)
        }
        tokenizer_config = {
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "additional_special_tokens": list(SPECIAL_TOKENS[3:8]),
            "auto_map": {
                "AutoProcessor": "processing_dimple.DimpleProcessor",
                "AutoTokenizer": ["tokenization_dimple.DimpleTokenizer", None],
            },
            "bos_token": "<|im_start|>",
            "chat_template": DEFAULT_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "mask_token": "<|mask|>",
            "model_max_length": 32768,
            "pad_token": "<|endoftext|>",
            "padding_side": "right",
            "processor_class": "DimpleProcessor",
            "split_special_tokens": False,
            "tokenizer_class": "DimpleTokenizer",
            "unk_token": "<|endoftext|>",
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
        preprocessor_config = {
            "auto_map": {
                "AutoImageProcessor": "image_processing_dimple.DimpleImageProcessor",
                "AutoProcessor": "processing_dimple.DimpleProcessor",
            },
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_processor_type": "DimpleImageProcessor",
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "max_pixels": max_pixels,
            "merge_size": 2,
            "min_pixels": min_pixels,
            "patch_size": 14,
            "processor_class": "DimpleProcessor",
            "resample": 3,
            "rescale_factor": 0.00392156862745098,
            "size": {"max_pixels": max_pixels, "min_pixels": min_pixels},
            "temporal_patch_size": 2,
        }
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_config, indent=2), encoding="utf-8")
        chat_template = json.dumps({"chat_template": DEFAULT_CHAT_TEMPLATE})
        (folder / "chat_template.json").write_text(chat_template, encoding="utf-8")
        for name in PROCESSOR_CODE_FILES:
            shutil.copy(REPO_ROOT / name, folder / name)
        return folder

    return write


@pytest.fixture
def fresh_python(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Factory ``fresh_python(script, *args)``: run ``script`` in a new interpreter where ``dimple`` cannot be
    imported (see ``isolated.py``), offline, outside the repo, so remote-code classes can only come from
    ``transformers_modules``. Raises with the child's stderr if it fails.
    """
    workdir = tmp_path / "fresh"
    workdir.mkdir()

    def run(script: str, *args: str) -> subprocess.CompletedProcess:
        result = run_without_dimple(script, workdir, args=args)
        if result.returncode != 0:
            raise AssertionError(f"fresh process failed ({result.returncode}):\n{result.stderr[-4000:]}")
        return result

    return run
