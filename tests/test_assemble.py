"""`dimple assemble`: a Dimple from tiny parents built with transformers' own classes (see tests/parents.py).

The parents are written as the released ones are (Dream's config.json and tokenizer config naming Dream's own code,
Qwen2.5-VL in both weight layouts); their "remote code" files raise on import, so any code run from them fails.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dimple import DimpleConfig, DimpleModel, DimpleProcessor
from dimple.cli import main
from dimple.processing_dimple import DEFAULT_CHAT_TEMPLATE
from dimple.tiny.bundled import BUNDLED_CHECKPOINT
import dimple.training.assemble as assembling
from dimple.training.assemble import AssembleError, assemble

from isolated import run_without_dimple
from parents import DECODER, VISION, drop_mask_token, write_dream, write_qwen2_vl, write_qwen25_vl


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture
def dream(tmp_path) -> Path:
    (tmp_path / "dream").mkdir()
    return write_dream(tmp_path / "dream")


@pytest.fixture
def qwen_vl(tmp_path) -> Path:
    (tmp_path / "vl").mkdir()
    return write_qwen25_vl(tmp_path / "vl")


@pytest.mark.parametrize("nested, shard_size", [(False, 5 * 1024**3), (True, 100_000)])
def test_every_parent_tensor_is_copied_and_the_config_has_the_released_fields(dream, tmp_path, nested, shard_size):
    (tmp_path / "vl").mkdir()
    vision = write_qwen25_vl(tmp_path / "vl", nested=nested)
    out = assemble(dream, vision, tmp_path / "dimple", max_shard_size=shard_size)
    result, decoder_weights, vision_weights = weights(out), load_file(dream / "model.safetensors"), load_file(
        vision / "model.safetensors")
    for name, tensor in decoder_weights.items():
        assert torch.equal(result[name], tensor) and result[name].dtype == tensor.dtype, name
    tower = {name.removeprefix("model."): t for name, t in vision_weights.items() if "visual." in name}
    assert tower and all(torch.equal(result[name], tensor) for name, tensor in tower.items())
    projector = {name: t for name, t in result.items() if name.startswith("img_projector.")}
    assert set(result) == set(decoder_weights) | set(tower) | set(projector)
    assert projector["img_projector.linear_1.weight"].shape == (DECODER["hidden_size"], VISION["out_hidden_size"])
    assert projector["img_projector.linear_2.weight"].shape == (DECODER["hidden_size"], DECODER["hidden_size"])
    assert not projector["img_projector.linear_1.bias"].any()
    assert abs(float(projector["img_projector.linear_1.weight"].std()) - 0.02) < 0.003
    if shard_size < 10**6:  # sharded: an index, every shard within the limit unless it holds a single tensor
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(result) and len(set(index["weight_map"].values())) > 2
        for shard in set(index["weight_map"].values()):
            tensors = load_file(out / shard)
            assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= shard_size

    config = json.loads((out / "config.json").read_text())
    released = json.loads((BUNDLED_CHECKPOINT / "config.json").read_text())
    assert set(config) == set(released)  # (the nested vision_config's generic keys vary with the transformers release)
    dream_config = json.loads((dream / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "rope_theta", "mask_token_id",
                "pad_token_id", "eos_token_id", "vocab_size", "rms_norm_eps"):
        assert config[key] == dream_config[key], key
    vl_config = json.loads((vision / "config.json").read_text())
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert config[key] == vl_config[key], key
    loaded_tower = DimpleConfig.from_pretrained(out).vision_config
    for key in assembling.VISION_FIELDS:
        assert getattr(loaded_tower, key) == vl_config["vision_config"][key], key
    # Head size 16 does not fit the tower parent's [2, 2, 2] (head size 12): Qwen2.5-VL's 2:3:3 split instead.
    assert config["mrope_section"] == [2, 3, 3] and config["full_attn_mask"] is True and config["use_cache"] is False

    processor = DimpleProcessor.from_pretrained(out)
    assert processor.chat_template == DEFAULT_CHAT_TEMPLATE and processor.tokenizer.padding_side == "left"
    assert processor.tokenizer.mask_token_id == config["mask_token_id"]
    assert processor.tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert processor.image_processor.size == {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 64}
    assert not list(tmp_path.glob(".dimple.*"))  # no staging folder left behind


def test_assembled_checkpoint_loads_with_auto_classes_without_the_package_and_generates(dream, qwen_vl, tmp_path):
    out = assemble(dream, qwen_vl, tmp_path / "dimple")
    script = """
import sys
from PIL import Image, ImageDraw
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
assert type(AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True)) is type(model)
processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
image = Image.new("RGB", (60, 90), "white"); ImageDraw.Draw(image).rectangle((5, 5, 40, 70), fill=(40, 80, 220))
chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}]
inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=6, return_dict_in_generate=True)
answer = out.sequences[0, inputs["input_ids"].shape[1]:]
print(type(model).__module__, answer.numel(), int((answer == model.config.mask_token_id).sum()), out.num_forward_passes)
"""
    result = run_without_dimple(script, tmp_path, args=(str(out),))
    assert result.returncode == 0, result.stderr
    module, length, masks, passes = result.stdout.split()
    assert module.startswith("transformers_modules") and (int(length), int(masks)) == (6, 0) and int(passes) >= 1
    # In this interpreter too: strict loading finds every weight, and the model sees the picture.
    model = DimpleModel.from_pretrained(out)
    assert model.img_projector.linear_1.in_features == VISION["out_hidden_size"]


def edit_json(path: Path, **changes) -> None:
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))


def test_unfit_parents_are_refused_with_what_differs(dream, qwen_vl, tmp_path):
    out = tmp_path / "dimple"
    (tmp_path / "qwen2vl").mkdir()
    with pytest.raises(AssembleError, match="Qwen2-VL checkpoint .* no window attention"):
        assemble(dream, write_qwen2_vl(tmp_path / "qwen2vl"), out)
    (tmp_path / "vl-ids").mkdir()
    ids_message = r"image-token ids differ: .*image_token_id is 300 .*<\|image_pad\|> at 486"
    with pytest.raises(AssembleError, match=ids_message):
        assemble(dream, write_qwen25_vl(tmp_path / "vl-ids", image_token_id=300), out)
    with pytest.raises(AssembleError, match="model_type is 'qwen2_5_vl'; Dimple's decoder is a Dream"):
        assemble(qwen_vl, qwen_vl, out)
    with pytest.raises(AssembleError, match="vision parent's model_type is 'Dream'"):
        assemble(dream, dream, out)

    edit_json(dream / "config.json", num_hidden_layers=3)
    with pytest.raises(AssembleError, match=r"no parent tensor for 12 weights \(model\.layers\.2\."):
        assemble(dream, qwen_vl, out)
    edit_json(dream / "config.json", num_hidden_layers=1)
    with pytest.raises(AssembleError, match=r"12 parent tensors fit no Dimple weight \(model\.layers\.1\."):
        assemble(dream, qwen_vl, out)
    edit_json(dream / "config.json", num_hidden_layers=2, intermediate_size=96)
    shape_message = r"down_proj.weight in model.safetensors has shape \[64, 128\], but the parents' .* \[64, 96"
    with pytest.raises(AssembleError, match=shape_message):
        assemble(dream, qwen_vl, out)
    edit_json(dream / "config.json", intermediate_size=128, mask_token_id=487)
    with pytest.raises(AssembleError, match="mask_token_id 487 but its tokenizer has <\\|mask\\|> at 488"):
        assemble(dream, qwen_vl, out)
    edit_json(dream / "config.json", mask_token_id=488)
    drop_mask_token(dream)
    with pytest.raises(AssembleError, match="vocabulary has no <\\|mask\\|> token"):
        assemble(dream, qwen_vl, out)
    assert not out.exists() and not list(tmp_path.glob(".dimple.*"))


def test_output_is_written_atomically_into_a_new_folder(dream, qwen_vl, tmp_path, monkeypatch):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(AssembleError, match="not an empty folder"):
        assemble(dream, qwen_vl, tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(assembling, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        assemble(dream, qwen_vl, tmp_path / "dimple")
    assert not (tmp_path / "dimple").exists() and not list(tmp_path.glob(".dimple.*"))
    monkeypatch.undo()
    (tmp_path / "empty").mkdir()
    assert (assemble(dream, qwen_vl, tmp_path / "empty") / "config.json").is_file()


def test_dimple_assemble_command(dream, qwen_vl, tmp_path, capsys):
    assert main(["assemble", "--decoder", str(dream), "--vision", str(qwen_vl), "--out", str(tmp_path / "d")]) == 0
    assert "dimple train --stage align" in capsys.readouterr().out
    assert (tmp_path / "d" / "model.safetensors").is_file()
    assert main(["assemble", "--decoder", str(dream), "--vision", str(tmp_path / "nowhere"), "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert "neither a folder nor a Hub id" in err and len(err.strip().splitlines()) == 1
    assert main(["assemble", "--decoder", str(dream), "--vision", "./nowhere", "--out", "x"]) == 2
    assert "neither a folder nor a Hub id" in capsys.readouterr().err
    assert main(["assemble", "--decoder", str(dream), "--vision", str(dream), "--out", str(tmp_path / "e")]) == 2
    assert "Qwen2.5-VL" in capsys.readouterr().err
