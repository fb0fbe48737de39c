"""A Hugging Face Space folder that runs the demo: `dimple demo [MODEL] --write-space FOLDER`.

The folder holds app.py (load the model, build the page, serve it on the Space's port), README.md with the Space's
front matter (Gradio SDK, app file), requirements.txt, and a copy of this package as `dimple/` (with the bundled
checkpoint when no model is named), so the Space needs nothing but PyPI. Upload it with
`hf upload --repo-type space OWNER/NAME FOLDER .`; a named Hub model is then downloaded by the Space itself.
"""

import shutil
from importlib import metadata
from pathlib import Path

from ..atomic_write import publish_folder

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# The package's dependencies (pyproject.toml) and the demo extra's gradio; a test keeps the two lists in step.
SPACE_REQUIREMENTS = (
    "transformers>=5.12,<6",
    "torch>=2.4",
    "tokenizers>=0.22",
    "huggingface_hub>=1.0",
    "safetensors>=0.4",
    "pillow>=10.1",
    "gradio>=6,<7",
)
SPACE_SDK_FALLBACK = "6.0.0"

APP_TEMPLATE = '''"""The Dimple demo as a Hugging Face Space (written by `dimple demo --write-space`)."""

import os

from dimple.demo.app import build_app, launch
from dimple.demo.command import load_for_demo

MODEL = {model!r}  # None: the tiny checkpoint bundled in dimple/tiny/checkpoint

model, processor = load_for_demo(MODEL)
demo = build_app(model, processor, title=MODEL or "Dimple (tiny checkpoint)")

if __name__ == "__main__":  # how Spaces run it: `python app.py`
    launch(demo, "0.0.0.0", int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
'''

README_TEMPLATE = """---
title: Chat with Dimple
emoji: 🎨
colorFrom: blue
colorTo: yellow
sdk: gradio
sdk_version: {sdk_version}
app_file: app.py
pinned: false
license: apache-2.0
---

Chat with Dimple ({model}), the discrete-diffusion multimodal LLM, and watch each answer denoise: the answer starts
as masks and is unmasked over a few forward passes, every token shaded by the step that committed it.
Written by `dimple demo --write-space`; the `dimple/` folder is the package it runs.
"""


def package_files(folder: Path, bundled: bool) -> dict[str, list[Path]]:
    """Files of the package to copy, by subfolder: the modules, the demo, the tiny package (and its checkpoint)."""
    parts = {"": sorted(folder.glob("*.py")), "demo": sorted((folder / "demo").glob("*.py")),
             "tiny": sorted((folder / "tiny").glob("*.py"))}
    if bundled:
        parts["tiny/checkpoint"] = sorted(path for path in (folder / "tiny" / "checkpoint").iterdir() if path.is_file())
    return parts


def copy_into(files: list[Path]):
    def write(staging: Path) -> None:
        for path in files:
            shutil.copyfile(path, staging / path.name)
    return write


def write_space(folder: str | Path, model: str | None) -> Path:
    """Write (or refresh) the Space folder for `model` (None: the bundled checkpoint); returns the folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; name a folder for the Space")
    try:
        sdk_version = metadata.version("gradio")
    except metadata.PackageNotFoundError:
        sdk_version = SPACE_SDK_FALLBACK
    for subfolder, files in package_files(PACKAGE_ROOT, bundled=model is None).items():
        publish_folder(folder / "dimple" / subfolder, copy_into(files))

    def write_top(staging: Path) -> None:
        (staging / "app.py").write_text(APP_TEMPLATE.format(model=model))
        (staging / "README.md").write_text(
            README_TEMPLATE.format(sdk_version=sdk_version, model=model or "the bundled tiny checkpoint")
        )
        (staging / "requirements.txt").write_text("\n".join(SPACE_REQUIREMENTS) + "\n")

    return publish_folder(folder, write_top)
