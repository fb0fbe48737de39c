"""The `dimple` command and the bundled tiny checkpoint."""

import json
import os
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_errors import user_error_line
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from dimple import DimpleModel, DimpleProcessor
from dimple.tiny.build import build_tiny_processor
from dimple.tiny.bundled import BUNDLED_CHECKPOINT
from dimple.tiny.train import COUNT_WORDS, EXAMPLE_INDEX, SPLIT_SEEDS, render, trained_config

README = Path(__file__).resolve().parents[1] / "README.md"


# A PYTHONPATH that points `dimple` at a checkout under test is kept, so the command runs that checkout's code.
CLI_ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"} | (
    {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}
)


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dimple", *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=CLI_ENV
    )


def test_bundled_checkpoint_is_the_model_the_training_script_defines():
    processor = build_tiny_processor()
    bundled = load_file(BUNDLED_CHECKPOINT / "model.safetensors")
    defined = DimpleModel(trained_config(processor)).state_dict()
    assert {key: value.shape for key, value in bundled.items()} == {key: value.shape for key, value in defined.items()}
    assert all(value.dtype == torch.float32 for value in bundled.values())
    saved = json.loads((BUNDLED_CHECKPOINT / "config.json").read_text())
    for key, value in trained_config(processor).to_diff_dict().items():
        if key not in ("vision_config", "transformers_version", "dtype"):
            assert saved[key] == value, key
    assert saved["full_attn_mask"] is True
    assert DimpleProcessor.from_pretrained(BUNDLED_CHECKPOINT).tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert (BUNDLED_CHECKPOINT / "model.safetensors").stat().st_size < 20 * 2**20


def test_generate_on_the_bundled_model_with_an_image(tmp_path):
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    result = run_cli("generate", "--image", str(tmp_path / "red.png"), "--prompt", "What colour?",
                     "--max-new-tokens", "8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "forward passes:" in result.stdout and "tokens per forward:" in result.stdout


def test_user_errors_exit_nonzero_without_traceback(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    cases = (
        (["--image", str(tmp_path / "missing.png")], "image file not found"),
        (["--image", str(tmp_path / "broken.png")], "cannot read image"),
        (["--model", str(tmp_path / "no-such-model")], "model not found"),
        (["--model", str(tmp_path)], "cannot load model"),
        (["--template", "no slots here"], "the template has no <|mask|> slot"),
        (["--gif", str(tmp_path / "no-such-folder" / "steps.gif")], "the folder for --gif"),
        (["--gif", str(tmp_path)], "is a folder; give a file name"),
        (["--html", str(tmp_path)], "is a folder; give a file name"),
        (["--image", str(tmp_path)], f"--image {tmp_path} is a folder; give an image file inside it"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer, got 0"),
        (["--steps", "-2"], "--steps must be a positive integer, got -2"),
        (["--max-new-tokens", "5000"], "exceed the model's max_position_embeddings"),  # refused by generate
    )
    # The cases are independent processes: start them together, they mostly wait on imports.
    running = [
        (subprocess.Popen([sys.executable, "-m", "dimple", "generate", "--prompt", "hi", *args], cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CLI_ENV), message)
        for args, message in cases
    ]
    for process, message in running:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, stderr[-2000:]
        assert message in user_error_line(stderr)
        assert stdout == ""


def test_an_image_over_the_decompression_limit_is_one_line(monkeypatch, tmp_path, capsys):
    """PIL refuses pictures far above Image.MAX_IMAGE_PIXELS (a decompression-bomb guard): a user error, exit 2."""
    from dimple import cli

    Image.new("RGB", (100, 100), "white").save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert cli.main(["generate", "--image", str(tmp_path / "big.png"), "--prompt", "Hi", "--quiet"]) == 2
    assert "is too large to read safely" in user_error_line(capsys.readouterr().err)


def test_generate_prints_an_empty_answer_as_the_api_gives_it(tmp_path):
    """A blank picture makes the bundled model answer with end-of-text first: the command prints the same (empty)
    answer as `generate` + post-processing, instead of failing."""
    Image.new("RGB", (300, 300), "white").save(tmp_path / "blank.png")
    model = DimpleModel.from_pretrained(BUNDLED_CHECKPOINT).eval()
    processor = DimpleProcessor.from_pretrained(BUNDLED_CHECKPOINT)
    with Image.open(tmp_path / "blank.png") as image:
        content = [{"type": "image", "image": image.convert("RGB")}, {"type": "text", "text": "Describe the image."}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )
    answer = model.generate(**inputs, max_new_tokens=32)[:, inputs["input_ids"].shape[1]:]
    assert answer[0, 0] == model.config.eos_token_id  # the empty-answer case this test is about
    expected = processor.post_process_image_text_to_text(answer)[0]
    result = run_cli("generate", "--image", str(tmp_path / "blank.png"), "--prompt", "Describe the image.",
                     "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[0] == expected == ""


def test_a_failure_inside_decoding_keeps_its_traceback(monkeypatch, capsys):
    """Only input checks make one-line user errors; an error raised once decoding has started is a bug and propagates
    (`python -m dimple` then prints its traceback and exits with 1)."""
    from dimple import cli

    def broken_forward(self, *args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(DimpleModel, "forward", broken_forward)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(["generate", "--prompt", "Hi", "--max-new-tokens", "4", "--quiet"])
    assert "dimple: error" not in capsys.readouterr().err


def test_generate_draws_every_denoising_step(tmp_path):
    for name, colour in (("red.png", (200, 30, 30)), ("blue.jpg", (20, 40, 210))):
        Image.new("RGB", (64, 48), colour).save(tmp_path / name)
    result = run_cli(
        "generate", "--image", "red.png", "--image", "blue.jpg", "--prompt", "Compare the pictures.",
        "--max-new-tokens", "10", "--threshold", "0", "--gif", "steps.gif", "--html", "steps.html", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    answer, stats = result.stdout.rstrip("\n").rsplit("\n", 1)  # the answer line may be empty
    passes = int(re.search(r"forward passes: (\d+)", stats).group(1))
    assert passes > 1  # no threshold: the schedule spreads the 10 tokens over several steps
    assert "denoising" in result.stderr and f"{passes}/{passes}" in result.stderr
    with Image.open(tmp_path / "steps.gif") as gif:
        assert gif.n_frames == passes
        gif.seek(passes - 1)
        gif.convert("RGB").load()
    page = (tmp_path / "steps.html").read_text()
    assert all(f'data-step="{step}"' in page for step in range(1, passes + 1))
    assert f'data-step="{passes + 1}"' not in page


def test_generate_with_a_template_keeps_its_fixed_text(tmp_path):
    # The bundled model is trained on pictures like this one ("Describe the image." -> "one red square"); the
    # template fixes the first word to "two" and a closing word, and leaves the slots between to the model; slots
    # it fills with <|endoftext|> must not cut the fixed text after them.
    image = Image.new("RGB", (84, 84), "white")
    ImageDraw.Draw(image).rectangle((32, 32, 52, 52), fill=(220, 40, 40))
    image.save(tmp_path / "red.png")
    result = run_cli("generate", "--image", str(tmp_path / "red.png"), "--prompt", "Describe the image.",
                     "--template", "two" + "<|mask|>" * 5 + " done", "--quiet", "--no-cache", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    answer = result.stdout.splitlines()[0]
    assert answer.startswith("two red") and answer.endswith(" done")
    assert "denoising" not in result.stderr


def test_generate_loads_a_model_folder(tmp_path):
    from dimple.remote_code import install_code

    install_code(BUNDLED_CHECKPOINT, out=tmp_path / "model")
    result = run_cli("generate", "--model", str(tmp_path / "model"), "--prompt", "Hello", "--max-new-tokens", "4",
                     "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "forward passes:" in result.stdout


def test_the_readme_quick_start_command_describes_the_bundled_example_correctly():
    """The quick start's `dimple generate ...` as written in README, from the repo root; the expected answer is the
    synthetic generator's own label for the held-out example picture, not a recorded output."""
    quick_start = README.read_text().split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    command = shlex.split(quick_start.splitlines()[0].split("&&", 1)[1])
    assert command[:2] == ["dimple", "generate"]
    image, colour, shape, count = render(random.Random(SPLIT_SEEDS["test"] + EXAMPLE_INDEX))
    with Image.open(README.parent / "tiny" / "checkpoint" / "example.png") as bundled:
        assert list(bundled.convert("RGB").getdata()) == list(image.getdata())
    result = run_cli(*command[1:], cwd=README.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[0] == f"{COUNT_WORDS[count - 1]} {colour} {shape}{'s' if count > 1 else ''}"
