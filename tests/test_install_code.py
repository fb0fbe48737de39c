"""`dimple install-code`: a folder laid out like the released `rp-yu/Dimple-7B` repo runs our code afterwards.

The released repo holds transformers-4.46 remote code that fails to import on 5.x; here it is simulated by
modules that raise on import. After the command, a fresh interpreter in which `dimple` cannot be imported loads
the folder through the Auto classes and gets our classes from the folder, with the same logits as in-process.
"""

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from isolated import run_without_dimple

from dimple.remote_code import code_files, install_code
from dimple.tiny import build_tiny_processor
from dimple.tiny_checkpoint import build_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
RELEASED_CODE = (
    "configuration_dimple.py", "modeling_dimple.py", "generation_utils.py", "processing_dimple.py",
    "image_processing_dimple.py", "tokenization_dimple.py",
)
OLD_CODE = 'raise ImportError("transformers 4.46 remote code: VideoInput moved to transformers.video_utils")\n'


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def released_config(saved: dict) -> dict:
    """The flat 4.46 config.json of the released repo, with its two auto_map entries, for a saved tiny config."""
    config = {key: value for key, value in saved.items() if key not in ("dtype", "auto_map", "vision_config")}
    vision_keys = ("depth", "fullatt_block_indexes", "hidden_size", "intermediate_size", "num_heads",
                   "out_hidden_size", "window_size")
    config["vision_config"] = {key: saved["vision_config"][key] for key in vision_keys} | {"model_type": "dimple"}
    config.update(
        torch_dtype="float32",
        transformers_version="4.46.2",
        auto_map={"AutoConfig": "configuration_dimple.DimpleConfig", "AutoModel": "modeling_dimple.DimpleModel"},
    )
    return config


@pytest.fixture
def released_repo(tmp_path, released_layout_dir):
    """A released-layout folder: tiny weights, flat config, 4.46 processor files, broken old code.

    config.json and modeling_dimple.py are symlinks into a `blobs/` folder, as in a Hub cache snapshot.
    """
    processor = build_tiny_processor()
    model = build_tiny_model(processor)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    folder = released_layout_dir(min_pixels=processor.image_processor.size["shortest_edge"],
                                 max_pixels=processor.image_processor.size["longest_edge"])
    (folder / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    (folder / "generation_config.json").write_text((saved / "generation_config.json").read_text())
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    config_text = json.dumps(released_config(json.loads((saved / "config.json").read_text())), indent=2)
    (blobs / "config-blob").write_text(config_text)
    (folder / "config.json").symlink_to(blobs / "config-blob")
    for name in RELEASED_CODE:
        (folder / name).unlink(missing_ok=True)
        (folder / name).write_text(OLD_CODE)
    (folder / "modeling_dimple.py").unlink()
    (blobs / "modeling-blob").write_text(OLD_CODE)
    (folder / "modeling_dimple.py").symlink_to(blobs / "modeling-blob")
    return folder, model


def load_script(folders: list[Path], inputs_path: Path) -> str:
    return textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
        inputs = torch.load({str(inputs_path)!r})
        for folder in {[str(folder) for folder in folders]!r}:
            model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
            for auto_class in (AutoModelForImageTextToText, AutoModelForCausalLM):
                assert type(auto_class.from_pretrained(folder, trust_remote_code=True)) is type(model)
            processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
            for obj in (model, processor, processor.tokenizer, processor.image_processor):
                assert type(obj).__module__.startswith("transformers_modules."), type(obj).__module__
            assert type(model).__name__ == "DimpleModel" and type(processor).__name__ == "DimpleProcessor"
            with torch.no_grad():
                logits = model(**inputs).logits
                out = model.generate(**inputs, max_new_tokens=4)
            assert out.shape[1] == inputs["input_ids"].shape[1] + 4
            torch.save(logits, folder + "/logits.pt")
        assert "dimple" not in sys.modules
        print("loaded", {len(folders)})
        """
    )


def model_inputs(tmp_path: Path, make_image) -> Path:
    processor = build_tiny_processor()
    messages = [{"role": "user", "content": [{"type": "image", "image": make_image(64, 48)},
                                             {"type": "text", "text": "What is shown in this picture?"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    path = tmp_path / "inputs.pt"
    torch.save(dict(inputs), path)
    return path


def test_install_code_in_place_and_into_a_new_folder(released_repo, tmp_path, make_image):
    folder, model = released_repo
    blobs = tmp_path / "blobs"
    before = {path.name: path.read_bytes() for path in folder.iterdir() if not path.is_symlink()}
    blob_bytes = {path.name: path.read_bytes() for path in blobs.iterdir()}
    weights_hash = sha256(folder / "model.safetensors")
    configs_before = {
        name: json.loads((folder / name).read_text())
        for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json")
    }

    # A new folder first (the snapshot must stay byte-identical), through the command line.
    new = tmp_path / "switched"
    result = subprocess.run(
        [sys.executable, "-m", "dimple", "install-code", str(folder), "--out", str(new)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trust_remote_code=True" in result.stdout
    assert {path.name: path.read_bytes() for path in folder.iterdir() if not path.is_symlink()} == before
    assert (folder / "modeling_dimple.py").read_text() == OLD_CODE
    assert (new / "model.safetensors").is_symlink()
    assert (new / "model.safetensors").resolve() == (folder / "model.safetensors").resolve()
    assert not (new / "config.json").is_symlink() and not (new / "modeling_dimple.py").is_symlink()

    # Then in place.
    written = install_code(folder)
    assert {path.name for path in written} >= set(RELEASED_CODE) | set(configs_before)
    assert {path.name: path.read_bytes() for path in blobs.iterdir()} == blob_bytes, "Hub cache blobs changed"
    assert sha256(folder / "model.safetensors") == weights_hash
    for target in (folder, new):
        for source in code_files():
            assert (target / source.name).read_text() == source.read_text()
        for name, old in configs_before.items():
            updated = json.loads((target / name).read_text())
            assert {k: v for k, v in updated.items() if k != "auto_map"} == {
                k: v for k, v in old.items() if k != "auto_map"
            }, name
        auto_map = json.loads((target / "config.json").read_text())["auto_map"]
        assert auto_map == {
            "AutoConfig": "configuration_dimple.DimpleConfig",
            "AutoModel": "modeling_dimple.DimpleModel",
            "AutoModelForImageTextToText": "modeling_dimple.DimpleModel",
            "AutoModelForCausalLM": "modeling_dimple.DimpleModel",
        }
        tokenizer_map = json.loads((target / "tokenizer_config.json").read_text())["auto_map"]
        assert tokenizer_map["AutoTokenizer"] == ["tokenization_dimple.DimpleTokenizer", None]

    inputs_path = model_inputs(tmp_path, make_image)
    workdir = tmp_path / "fresh"
    workdir.mkdir()
    result = run_without_dimple(load_script([folder, new], inputs_path), workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("loaded 2")
    with torch.no_grad():
        expected = model(**torch.load(inputs_path)).logits
    for target in (folder, new):
        torch.testing.assert_close(torch.load(target / "logits.pt"), expected, atol=1e-5, rtol=0)


def test_the_switched_folder_would_fail_without_the_command(released_repo, tmp_path):
    """Guards the test above: the simulated released code really is what a 5.x user would get."""
    folder, _ = released_repo
    workdir = tmp_path / "fresh"
    workdir.mkdir()
    script = f"from transformers import AutoModel\nAutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
    result = run_without_dimple(script, workdir)
    assert result.returncode != 0 and "transformers 4.46 remote code" in result.stderr


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "checkpoint folder not found"),
        ("not_dimple", "not a Dimple one"),
        ("no_weights", "has no weight files"),
        ("out_not_empty", "exists and is not empty"),
    ],
)
def test_install_code_user_errors(tmp_path, case, message):
    folder = tmp_path / "checkpoint"
    out_args = []
    if case != "missing":
        folder.mkdir()
        model_type = "llama" if case == "not_dimple" else "dimple"
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
        if case != "no_weights":
            (folder / "model.safetensors").write_bytes(b"weights")
    if case == "out_not_empty":
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "file.txt").write_text("x")
        out_args = ["--out", str(tmp_path / "busy")]
    result = subprocess.run(
        [sys.executable, "-m", "dimple", "install-code", str(folder), *out_args],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
