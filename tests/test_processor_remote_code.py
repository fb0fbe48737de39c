"""The processor's remote code: a saved processor, and a folder laid out like the released repo, load through
AutoProcessor(trust_remote_code=True) in a fresh interpreter without the package and process inputs exactly as
in-process (save_pretrained -> fresh process -> AutoProcessor)."""

import inspect
import json
from pathlib import Path

import torch
from conftest import PROCESSOR_CODE_FILES

from dimple.tiny.build import build_tiny_processor

REPO_ROOT = Path(__file__).resolve().parents[1]


def process_inputs(processor, spec: dict) -> dict:
    """Run both call styles on ``spec``; also run verbatim in the fresh process (via ``inspect.getsource``)."""
    from PIL import Image

    chat = processor.apply_chat_template(
        spec["messages"], tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True
    )
    prompts = [
        processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True, add_vision_id=False)
        for m in spec["batch"]
    ]
    batch = processor(
        text=prompts,
        images=[Image.open(path) for path in spec["batch_images"]],
        videos=None,
        padding="longest",
        return_tensors="pt",
    )
    return {"prompts": prompts, "chat": dict(chat), "batch": dict(batch)}


FRESH_SCRIPT = (
    "import json, sys\nimport torch\nfrom transformers import AutoProcessor\n\n"
    + inspect.getsource(process_inputs)
    + """
folder, spec_path, out_path = sys.argv[1:]
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
result = process_inputs(processor, json.loads(open(spec_path).read()))
result["modules"] = [
    type(processor).__module__,
    type(processor.image_processor).__module__,
    type(processor.tokenizer).__module__,
]
result["padding_side"] = processor.tokenizer.padding_side
result["dimple_imported"] = any(name == "dimple" or name.startswith("dimple.") for name in sys.modules)
result["sys_path"] = list(sys.path)
torch.save(result, out_path)
"""
)


def _spec(tmp_path: Path, image_file) -> Path:
    png = image_file("one.png", 300, 200, seed=7)
    jpeg = image_file("two.jpg", 64, 200, seed=8)
    spec = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look: "},
                    {"type": "image", "path": str(png)},
                    {"type": "image", "path": str(jpeg)},
                    {"type": "text", "text": "What differs?"},
                ],
            }
        ],
        "batch": [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
        ],
        "batch_images": [str(jpeg), str(png)],
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def _load_fresh(fresh_python, folder: Path, spec_path: Path, tmp_path: Path) -> dict:
    out_path = tmp_path / "fresh_out.pt"
    fresh_python(FRESH_SCRIPT, str(folder), str(spec_path), str(out_path))
    result = torch.load(out_path)
    assert all(module.startswith("transformers_modules") for module in result["modules"]), result["modules"]
    assert not result["dimple_imported"]
    assert str(REPO_ROOT) not in result["sys_path"]
    return result


def _assert_same_outputs(fresh: dict, local: dict) -> None:
    assert fresh["prompts"] == local["prompts"]
    for style in ("chat", "batch"):
        assert set(fresh[style]) == set(local[style])
        for key, value in local[style].items():
            assert torch.equal(fresh[style][key], value), (style, key)


def test_save_pretrained_round_trips_through_remote_code(processor, image_file, fresh_python, tmp_path):
    folder = tmp_path / "saved"
    processor.tokenizer.padding_side = "right"  # as training saved it; loading must still pad left
    processor.save_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    for name in PROCESSOR_CODE_FILES:
        assert (folder / name).read_text() == (REPO_ROOT / name).read_text()
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_dimple.DimpleProcessor"
    assert (
        processor_config["image_processor"]["auto_map"]["AutoImageProcessor"]
        == "image_processing_dimple.DimpleImageProcessor"
    )
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"]["AutoTokenizer"] == ["tokenization_dimple.DimpleTokenizer", None]

    spec_path = _spec(tmp_path, image_file)
    fresh = _load_fresh(fresh_python, folder, spec_path, tmp_path)
    assert fresh["padding_side"] == "left"
    local = process_inputs(processor, json.loads(spec_path.read_text()))
    mask = local["batch"]["attention_mask"]
    assert mask[0, 0] == 0 and mask[:, -1].all()  # the batch really is padded, on the left
    _assert_same_outputs(fresh, local)


def test_released_layout_loads_with_auto_processor(released_layout_dir, image_file, fresh_python, tmp_path):
    min_pixels, max_pixels = 56 * 56, 28 * 28 * 16
    folder = released_layout_dir(min_pixels, max_pixels)
    spec_path = _spec(tmp_path, image_file)
    fresh = _load_fresh(fresh_python, folder, spec_path, tmp_path)
    assert fresh["padding_side"] == "left"
    local = process_inputs(
        build_tiny_processor(min_pixels=min_pixels, max_pixels=max_pixels), json.loads(spec_path.read_text())
    )
    # max_pixels from the file is in force: the 300x200 PNG becomes 112x84, not 252x168 as with the default.
    assert local["chat"]["image_grid_thw"][0].tolist() == [1, 6, 8]
    _assert_same_outputs(fresh, local)
