"""Safe loading: safetensors only (pickle is an explicit opt-in), no network for local folders, PIL's bomb guard on."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModel

from dimple import DimpleModel
from dimple.tiny import build_tiny_processor
from dimple.tiny_checkpoint import BUNDLED_CHECKPOINT, build_tiny_model


@pytest.fixture(scope="module")
def tiny():
    processor = build_tiny_processor()
    return processor, build_tiny_model(processor)


@pytest.fixture
def pickle_only(tiny, tmp_path) -> Path:
    """A checkpoint folder whose weights exist only as a pickle (pytorch_model.bin)."""
    _, model = tiny
    folder = tmp_path / "pickle_only"
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    theirs = b.state_dict()
    return all(torch.equal(value, theirs[key]) for key, value in a.state_dict().items())


def test_weights_are_saved_and_loaded_as_safetensors(tiny, tmp_path, monkeypatch):
    _, model = tiny
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load (pickle) was called while loading a safetensors checkpoint")

    monkeypatch.setattr(torch, "load", no_pickle)
    assert same_weights(DimpleModel.from_pretrained(tmp_path), model)


@pytest.mark.parametrize("loader", [DimpleModel.from_pretrained, AutoModel.from_pretrained])
def test_pickle_only_checkpoint_is_refused_by_default(pickle_only, loader):
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model.bin\).*use_safetensors=False"):
        loader(pickle_only)


def test_asking_for_safetensors_explicitly_also_refuses_pickle(pickle_only):
    with pytest.raises(OSError, match="no file named model.safetensors"):
        DimpleModel.from_pretrained(pickle_only, use_safetensors=True)


def test_pickle_weights_load_after_explicit_opt_in(tiny, pickle_only):
    _, model = tiny
    loaded = DimpleModel.from_pretrained(pickle_only, use_safetensors=False)
    assert same_weights(loaded, model)


NO_NETWORK = textwrap.dedent(
    """
    import socket, sys

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] if args and isinstance(args[0], socket.socket) else args)
        raise OSError("network access attempted")

    socket.socket.connect = socket.socket.connect_ex = refuse
    socket.create_connection = socket.getaddrinfo = refuse

    from PIL import Image
    bomb_guard = Image.MAX_IMAGE_PIXELS
    mode, folder = sys.argv[1], sys.argv[2]
    if mode == "package":
        import dimple  # registers the Auto classes
    from transformers import AutoModel, AutoProcessor
    remote = mode == "remote_code"
    model = AutoModel.from_pretrained(folder, trust_remote_code=remote)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=remote)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.new("RGB", (56, 56))], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert attempts == [], f"network access attempted: {attempts}"
    assert bomb_guard is not None and Image.MAX_IMAGE_PIXELS == bomb_guard, Image.MAX_IMAGE_PIXELS
    print("ok", type(model).__module__)
    """
)


@pytest.mark.parametrize("mode", ["package", "remote_code"])
def test_import_and_local_loading_never_touch_the_network(tiny, tmp_path, mode):
    """Sockets blocked and HF_HUB_OFFLINE unset: the point is that no connection is even attempted."""
    folder = BUNDLED_CHECKPOINT
    if mode == "remote_code":
        processor, model = tiny
        folder = tmp_path / "remote"
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    script = tmp_path / "no_network.py"
    script.write_text(NO_NETWORK, encoding="utf-8")
    blocked = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "PYTHONPATH")
    env = {key: value for key, value in os.environ.items() if key not in blocked}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run(
        [sys.executable, str(script), mode, str(folder)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected_module = "transformers_modules" if mode == "remote_code" else "dimple.modeling_dimple"
    assert result.stdout.split()[-1].startswith(expected_module)


def test_decompression_bomb_guard_applies_to_processor_inputs(tmp_path, monkeypatch):
    processor = build_tiny_processor()
    assert Image.MAX_IMAGE_PIXELS is not None
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 40,000 px is now above twice the limit
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi."}]}], add_generation_prompt=True
    )
    with pytest.raises(Image.DecompressionBombError):
        processor(text=[text], images=[str(path)], return_tensors="pt")
