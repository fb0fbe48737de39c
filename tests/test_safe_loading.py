"""Safe loading: safetensors only (pickle is an explicit opt-in), no network for local folders, PIL's bomb guard on,
and strict loading (missing/unexpected keys and NaN/inf weights refused unless `strict=False`)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModel
from transformers.utils import logging

from dimple import DimpleModel
from dimple.tiny.bundled import BUNDLED_CHECKPOINT
from prompts import encode


@pytest.fixture
def pickle_only(model, tmp_path) -> Path:
    """A checkpoint folder whose weights exist only as a pickle (pytorch_model.bin)."""
    folder = tmp_path / "pickle_only"
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    theirs = b.state_dict()
    return all(torch.equal(value, theirs[key]) for key, value in a.state_dict().items())


def test_weights_are_saved_and_loaded_as_safetensors(model, tmp_path, monkeypatch):
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


def test_pickle_weights_load_after_explicit_opt_in(model, pickle_only):
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
def test_import_and_local_loading_never_touch_the_network(processor, model, tmp_path, mode):
    """Sockets blocked and HF_HUB_OFFLINE unset: the point is that no connection is even attempted."""
    folder = BUNDLED_CHECKPOINT
    if mode == "remote_code":
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


def test_decompression_bomb_guard_applies_to_processor_inputs(processor, tmp_path, monkeypatch):
    assert Image.MAX_IMAGE_PIXELS is not None
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 40,000 px is now above twice the limit
    with pytest.raises(Image.DecompressionBombError):
        encode(processor, [("Hi.", [str(path)])])


# --- strict loading -----------------------------------------------------------------------------------------


def edited_checkpoint(tmp_path: Path, edit_weights=None, edit_config=None) -> Path:
    """A copy of the bundled checkpoint with its weights and/or config.json changed."""
    folder = tmp_path / "edited"
    shutil.copytree(BUNDLED_CHECKPOINT, folder)
    if edit_weights is not None:
        weights = load_file(folder / "model.safetensors")
        edit_weights(weights)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    if edit_config is not None:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def drop_lm_head(weights: dict) -> None:
    del weights["lm_head.weight"]


def fewer_layers(config: dict) -> None:
    config["num_hidden_layers"] = 4  # the weights hold 6


def more_layers(config: dict) -> None:
    config["num_hidden_layers"] = 8


def larger_vocabulary(config: dict) -> None:
    config["vocab_size"] = 600  # the weights hold 512 rows


def poison(weights: dict) -> None:
    weights["model.layers.2.mlp.down_proj.weight"][0, 0] = float("nan")
    weights["visual.merger.ln_q.weight"][1] = float("inf")


@pytest.mark.parametrize(
    ("edit_weights", "edit_config", "message"),
    [
        (drop_lm_head, None, r"no weights for 1 parameters of the model \(lm_head.weight\)"),
        (None, fewer_layers, r"holds 24 weights the model has no place for \(model.layers.4.input_layernorm"),
        (None, more_layers, r"no weights for 24 parameters .*model.layers.6.input_layernorm.weight"),
        (None, larger_vocabulary, r"2 weights have another shape than the config says \(lm_head.weight, model.embed"),
        (poison, None, r"2 weight tensors hold NaN or inf .*model.layers.2.mlp.down_proj.weight, visual.merger.ln_q"),
    ],
    ids=["no_lm_head", "config_with_fewer_layers", "config_with_more_layers", "config_with_another_vocabulary",
         "nan_and_inf_weights"],
)
@pytest.mark.parametrize("loader", [DimpleModel.from_pretrained, AutoModel.from_pretrained], ids=["dimple", "auto"])
def test_incomplete_or_non_finite_weights_are_refused(tmp_path, loader, edit_weights, edit_config, message):
    folder = edited_checkpoint(tmp_path, edit_weights, edit_config)
    with pytest.raises(ValueError, match=message + r".*strict=False"):
        loader(folder)


def test_strict_false_loads_a_partial_checkpoint_with_a_warning(tmp_path, caplog):
    """The opt-out for deliberate partial loads, e.g. training a new head."""
    folder = edited_checkpoint(tmp_path, drop_lm_head)
    logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            model, info = DimpleModel.from_pretrained(folder, strict=False, output_loading_info=True)
    finally:
        logging.disable_propagation()
    assert info["missing_keys"] == {"lm_head.weight"}
    assert "lm_head.weight" in caplog.text and "loaded anyway: strict=False" in caplog.text
    assert model.lm_head.weight.shape == (model.config.vocab_size, model.config.hidden_size)


def test_a_complete_checkpoint_reports_nothing_missing():
    model, info = DimpleModel.from_pretrained(BUNDLED_CHECKPOINT, output_loading_info=True)
    assert isinstance(model, DimpleModel)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
