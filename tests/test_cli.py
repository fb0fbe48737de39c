"""The `dimple` command and the bundled tiny checkpoint."""

import subprocess
import sys

import torch
from safetensors.torch import load_file

from dimple.tiny import build_tiny_processor
from dimple.tiny_checkpoint import BUNDLED_CHECKPOINT, build_tiny_model


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dimple", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )


def test_bundled_checkpoint_is_what_the_builder_makes():
    bundled = load_file(BUNDLED_CHECKPOINT / "model.safetensors")
    built = build_tiny_model(build_tiny_processor()).state_dict()
    assert set(bundled) == set(built)
    assert all(torch.equal(bundled[key], built[key]) for key in bundled)


def test_generate_on_the_bundled_model_with_an_image(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    result = run_cli("generate", "--image", str(tmp_path / "red.png"), "--prompt", "What colour?",
                     "--max-new-tokens", "8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "forward passes:" in result.stdout and "tokens per forward:" in result.stdout


def test_user_errors_exit_nonzero_without_traceback(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    for args, message in (
        (["--image", str(tmp_path / "missing.png")], "image file not found"),
        (["--image", str(tmp_path / "broken.png")], "cannot read image"),
        (["--model", str(tmp_path / "no-such-model")], "model not found"),
    ):
        result = run_cli("generate", "--prompt", "hi", *args, cwd=tmp_path)
        assert result.returncode == 2
        assert message in result.stderr and "Traceback" not in result.stderr
