"""`dimple train --stage align|ar|diffusion` on LLaVA-format data, starting from a Dimple assembled from tiny parents.

The data set is written by the test in LLaVA's format (JSON and JSONL, images drawn here, relative to an image
folder): single and multiple images, the placeholder before or after the question or absent, multi-turn, text only.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from dimple.cli import main
from dimple.tiny.build import build_tiny_processor
from dimple.training import DimpleSFTCollator, ar_objective, diffusion_objective
from dimple.training.assemble import assemble
from dimple.training.llava import LlavaDataset
from dimple.training.stages import BatchSeededCollator, IndexedSamples, prepare_stage, train_stage

from isolated import run_without_dimple
from parents import write_dream, write_qwen25_vl


COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (230, 200, 40)}
RECORDS = [
    {"id": "red", "image": "red.png",
     "conversations": [{"from": "human", "value": "<image>\nWhat colour is the shape?"},
                       {"from": "gpt", "value": "red"}]},
    {"id": "blue", "image": "blue.png",
     "conversations": [{"from": "human", "value": "What colour is the shape?\n<image>"},
                       {"from": "gpt", "value": "blue"}]},
    {"id": "two", "image": ["red.png", "blue.png"],
     "conversations": [{"from": "human", "value": "<image>\n<image>\nWhich colours?"},
                       {"from": "gpt", "value": "red and blue"}]},
    {"id": "text", "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello"}]},
    {"id": "turns", "image": "green.png",
     "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "green"},
                       {"from": "human", "value": "Shape?"}, {"from": "gpt", "value": "circle"}]},
    {"id": "bare", "image": "sub/yellow.png",
     "conversations": [{"from": "human", "value": "Describe the image."}, {"from": "gpt", "value": "a yellow circle"}]},
]
FAST = {"per_device_train_batch_size": 3, "warmup_steps": 0, "logging_steps": 1, "use_cpu": True,
        "disable_tqdm": True, "seed": 0, "save_strategy": "no"}


def draw(colour: str) -> Image.Image:
    image = Image.new("RGB", (56, 56), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((10, 10, 46, 46), fill=COLOURS[colour])
    return image


def write_llava(folder: Path, records: list[dict] = RECORDS, jsonl: bool = False) -> tuple[Path, Path]:
    images = folder / "images"
    (images / "sub").mkdir(parents=True, exist_ok=True)
    for colour in ("red", "blue", "green"):
        draw(colour).save(images / f"{colour}.png")
    draw("yellow").save(images / "sub" / "yellow.png")
    data = folder / ("data.jsonl" if jsonl else "data.json")
    data.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records, indent=1))
    return data, images


@pytest.fixture(scope="module")
def assembled(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parents")
    (root / "dream").mkdir()
    (root / "vl").mkdir()
    return assemble(write_dream(root / "dream"), write_qwen25_vl(root / "vl"), root / "dimple")


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> tuple[Path, Path]:
    return write_llava(tmp_path_factory.mktemp("llava"))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def stage_loss(model_dir: Path, llava: tuple[Path, Path], objective: str) -> float:
    """The objective on all six records as one batch (fixed padding and masks)."""
    run = prepare_stage(model_dir, llava[0], model_dir.parent / "unused", "ar", image_folder=llava[1])
    samples = IndexedSamples(run.dataset)
    batch = BatchSeededCollator(run.processor, seed=0)([samples[i] for i in range(len(samples))])
    model = run.trainer.model.eval()
    model.set_attention_mode(causal=objective == "ar")
    with torch.no_grad():
        if objective == "ar":
            return float(ar_objective(model, batch)[0])
        generator = torch.Generator().manual_seed(0)
        return float(diffusion_objective(model, batch, model.config.mask_token_id, generator=generator)[0])


# --- data ---------------------------------------------------------------------------------------------------


def test_llava_records_become_chat_samples_in_json_and_jsonl(tmp_path):
    data, images = write_llava(tmp_path)
    as_json = LlavaDataset(data, images)
    as_jsonl = LlavaDataset(write_llava(tmp_path, jsonl=True)[0], images)
    assert len(as_json) == len(as_jsonl) == 6

    def colour(image: Image.Image) -> str:
        return next(name for name, value in COLOURS.items() if image.getpixel((28, 28)) == value)

    def shape(sample):  # what each message holds, images as their colour
        out = []
        for message in sample["messages"]:
            content = message["content"]
            if not isinstance(content, str):
                content = [item["text"] if item["type"] == "text" else colour(item["image"]) for item in content]
            out.append((message["role"], content))
        return out

    expected = [
        [("user", ["red", "What colour is the shape?"]), ("assistant", "red")],
        [("user", ["What colour is the shape?", "blue"]), ("assistant", "blue")],
        [("user", ["red", "blue", "Which colours?"]), ("assistant", "red and blue")],
        [("user", ["Say hello."]), ("assistant", "hello")],
        [("user", ["green", "Colour?"]), ("assistant", "green"), ("user", ["Shape?"]), ("assistant", "circle")],
        [("user", ["yellow", "Describe the image."]), ("assistant", "a yellow circle")],
    ]
    assert [shape(as_json[i]) for i in range(6)] == expected == [shape(as_jsonl[i]) for i in range(6)]
    # The collator turns every kind into the training format: one image block per picture, both answers supervised.
    processor = build_tiny_processor()
    batch = DimpleSFTCollator(processor)([as_json[i] for i in range(6)])
    assert batch["image_grid_thw"].shape[0] == 6
    vision_start = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert (batch["input_ids"] == vision_start).sum(dim=1).tolist() == [1, 1, 2, 0, 1, 1]


def test_missing_images_are_named_or_skipped_and_bad_records_refused(tmp_path):
    data, images = write_llava(tmp_path)
    (images / "blue.png").unlink()
    with pytest.raises(ValueError, match=r"record 1 \(id 'blue'\): image .*blue.png not found"):
        LlavaDataset(data, images)
    dataset = LlavaDataset(data, images, missing_images="skip")
    assert (len(dataset), dataset.skipped) == (4, 2)
    bad = [
        ({"id": "x", "image": "red.png", "conversations": [{"from": "human", "value": "<image><image>?"},
                                                            {"from": "gpt", "value": "a"}]}, "1 images but 2 <image>"),
        ({"id": "x", "conversations": [{"from": "gpt", "value": "a"}]}, "alternate"),
        ({"id": "x", "conversations": [{"from": "robot", "value": "a"}]}, "'from'"),
        ({"id": "x", "conversations": []}, "no 'conversations'"),
        ({"id": "x", "image": 3, "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "a"}]},
         "file name"),
    ]
    for record, message in bad:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps([record]))
        with pytest.raises(ValueError, match=message):
            LlavaDataset(path, images)
    (tmp_path / "broken.jsonl").write_text(json.dumps(RECORDS[3]) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2"):
        LlavaDataset(tmp_path / "broken.jsonl")
    with pytest.raises(ValueError, match="--image-folder"):
        LlavaDataset(data)


# --- stages -------------------------------------------------------------------------------------------------


def test_align_trains_the_projector_only_and_lowers_the_loss(assembled, llava, tmp_path):
    before = stage_loss(assembled, llava, "ar")
    run = train_stage(assembled, llava[0], tmp_path / "align", "align", image_folder=llava[1],
                      training_args={**FAST, "max_steps": 8, "learning_rate": 1e-2})
    assert run.trainer.state.global_step == 8
    parent, trained = weights(assembled), weights(tmp_path / "align")
    assert set(parent) == set(trained)
    for name, tensor in parent.items():
        if name.startswith("img_projector."):
            assert not torch.equal(tensor, trained[name]), name
        else:
            assert torch.equal(tensor, trained[name]), name
    assert stage_loss(tmp_path / "align", llava, "ar") < before


@pytest.mark.parametrize(
    "stage, options",
    [("ar", {}), ("diffusion", {"complementary_masking": True, "time_weighting": True})],
)
def test_ar_and_diffusion_stages_train_projector_and_decoder_and_lower_the_loss(assembled, llava, tmp_path, stage,
                                                                               options):
    objective = "ar" if stage == "ar" else "diffusion"
    before = stage_loss(assembled, llava, objective)
    train_stage(assembled, llava[0], tmp_path / stage, stage, image_folder=llava[1],
                training_args={**FAST, "max_steps": 8, "learning_rate": 3e-3}, **options)
    parent, trained = weights(assembled), weights(tmp_path / stage)
    changed = {name.split(".")[0] for name in parent if not torch.equal(parent[name], trained[name])}
    assert changed == {"img_projector", "model", "lm_head"}  # the vision tower stays frozen
    assert stage_loss(tmp_path / stage, llava, objective) < before
    assert json.loads((tmp_path / stage / "config.json").read_text())["full_attn_mask"] is (stage == "diffusion")


def test_resuming_from_a_checkpoint_continues_the_same_run(assembled, llava, tmp_path):
    settings = {**FAST, "max_steps": 4, "learning_rate": 3e-3, "save_strategy": "steps", "save_steps": 2}
    whole = train_stage(assembled, llava[0], tmp_path / "whole", "diffusion", image_folder=llava[1],
                        training_args=settings, complementary_masking=True)
    assert (tmp_path / "whole" / "checkpoint-2" / "trainer_state.json").is_file()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = train_stage(assembled, llava[0], tmp_path / "resumed", "diffusion", image_folder=llava[1],
                          training_args=settings, complementary_masking=True, resume_from_checkpoint=True)
    losses = [[(entry["step"], entry["loss"]) for entry in run.trainer.state.log_history if "loss" in entry]
              for run in (whole, resumed)]
    # The resumed run starts at step 3 with checkpoint-2's history and logs the uninterrupted run's losses.
    assert [step for step, _ in losses[1]] == [1, 2, 3, 4] and resumed.trainer.state.global_step == 4
    assert [loss for _, loss in losses[1]] == pytest.approx([loss for _, loss in losses[0]], rel=1e-5)
    final = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert all(torch.allclose(final[0][name], final[1][name], atol=1e-6) for name in final[0])
    with pytest.raises(ValueError, match="nothing to resume"):
        prepare_stage(assembled, llava[0], tmp_path / "empty", "ar", image_folder=llava[1], resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="not a Trainer checkpoint"):
        prepare_stage(assembled, llava[0], tmp_path / "x", "ar", image_folder=llava[1], resume_from_checkpoint=tmp_path)


def test_stage_settings_are_checked(assembled, llava, tmp_path):
    with pytest.raises(ValueError, match="Unknown stage"):
        prepare_stage(assembled, llava[0], tmp_path, "pretrain", image_folder=llava[1])
    with pytest.raises(ValueError, match="diffusion stage"):
        prepare_stage(assembled, llava[0], tmp_path, "ar", image_folder=llava[1], complementary_masking=True)
    with pytest.raises(ValueError, match="nothing to train"):
        prepare_stage(assembled, llava[0], tmp_path, "align", image_folder=llava[1], freeze_projector=True)
    with pytest.raises(ValueError, match="not a Dimple folder"):
        prepare_stage(tmp_path, llava[0], tmp_path / "out", "ar", image_folder=llava[1])


# --- the command line, and the result in an interpreter without the package ---------------------------------


def test_dimple_train_command_saves_a_model_that_loads_with_auto_classes_and_generates(assembled, llava, tmp_path,
                                                                                      capsys):
    out = tmp_path / "run"
    code = main(["train", "--stage", "diffusion", "--model", str(assembled), "--data", str(llava[0]),
                 "--image-folder", str(llava[1]), "--out", str(out), "--max-steps", "2",
                 "--per-device-train-batch-size", "2", "--learning-rate", "1e-3", "--logging-steps", "1",
                 "--save-steps", "2", "--complementary-masking"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "stage diffusion: 2 steps on 6 samples" in printed.out and "loss: first" in printed.out
    assert (out / "checkpoint-2").is_dir() and (out / "modeling_dimple.py").is_file()
    script = """
import sys, torch
from PIL import Image, ImageDraw
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
image = Image.new("RGB", (56, 56), "white"); ImageDraw.Draw(image).ellipse((10, 10, 46, 46), fill=(220, 40, 40))
chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]}]
inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=5)
answer = out[0, inputs["input_ids"].shape[1]:]
print(type(model).__module__, answer.numel(), int((answer == model.config.mask_token_id).sum()))
"""
    result = run_without_dimple(script, tmp_path, args=(str(out),))
    assert result.returncode == 0, result.stderr
    module, length, masks = result.stdout.split()
    assert module.startswith("transformers_modules") and (int(length), int(masks)) == (5, 0)


def test_dimple_train_command_reports_input_problems_in_one_line(assembled, llava, tmp_path, capsys):
    data, images = write_llava(tmp_path)
    (images / "green.png").unlink()
    base = ["train", "--model", str(assembled), "--data", str(data), "--image-folder", str(images),
            "--out", str(tmp_path / "o"), "--max-steps", "1", "--per-device-train-batch-size", "2"]
    assert main([*base, "--stage", "ar"]) == 2
    err = capsys.readouterr().err
    assert "id 'turns'" in err and "green.png not found" in err and len(err.strip().splitlines()) == 1
    assert main([*base, "--stage", "ar", "--skip-missing-images", "--save-steps", "1"]) == 0
    assert "skipped 1 records whose image file is missing" in capsys.readouterr().out
    assert main([*base, "--stage", "ar", "--time-weighting"]) == 2
    assert "diffusion stage" in capsys.readouterr().err
    assert main([*base, "--stage", "ar", "--warmup-ratio", "2"]) == 2
    assert "--warmup-ratio" in capsys.readouterr().err
