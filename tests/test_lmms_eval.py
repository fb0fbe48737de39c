"""`lmms-eval --model dimple`: the entry-point plugin, its mapping of task settings, and a scored local task.

The README's command runs lmms-eval on `tests/lmms_eval_tasks/dimple_shapes` (six held-out pictures of the bundled
model's shapes task) in batches of four; the score must be 1.0 and every logged answer must equal what
`model.generate` gives for that prompt alone. The README's 7B commands cannot run here (GPU, benchmark downloads):
their tasks must exist in the installed lmms-eval and their settings must be ones Dimple accepts.
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dimple import DimpleModel, DimpleProcessor
from dimple.tiny.bundled import BUNDLED_CHECKPOINT

pytest.importorskip("lmms_eval", reason="the lmms-eval plugin needs pip install 'dimple-hf[eval]'")

from lmms_eval.utils import simple_parse_args_string  # noqa: E402

from dimple.lmms_eval_dimple import Dimple, decoding_kwargs, regularize_image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASK = REPO / "tests" / "lmms_eval_tasks" / "dimple_shapes"


def evaluation_blocks() -> list[str]:
    section = (REPO / "README.md").read_text().split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```bash\n")[1:]]


def solo_answer(model, processor, doc: dict) -> str:
    with Image.open(TASK / doc["image"]) as picture:
        image = picture.convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": doc["question"]}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=12)
    return processor.post_process_image_text_to_text(out[:, inputs["input_ids"].shape[1] :])[0]


def test_the_readme_command_scores_the_bundled_model_with_per_row_answers(tmp_path):
    command = shlex.split(evaluation_blocks()[0].splitlines()[1])
    assert command[:3] == ["lmms-eval", "--model", "dimple"] and "--batch_size" in command
    command[command.index("--output_path") + 1] = str(tmp_path / "results")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "OMP_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    executable = Path(sys.executable).with_name("lmms-eval")
    result = subprocess.run(
        [str(executable), *command[1:], "--log_samples"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    [results_file] = (tmp_path / "results").rglob("*_results.json")
    scores = json.loads(results_file.read_text())["results"]["dimple_shapes"]
    assert scores["exact_match,none"] == 1.0
    [samples_file] = (tmp_path / "results").rglob("*_samples_dimple_shapes.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 6
    model = DimpleModel.from_pretrained(BUNDLED_CHECKPOINT).eval()
    processor = DimpleProcessor.from_pretrained(BUNDLED_CHECKPOINT)
    docs = [json.loads(line) for line in (TASK / "shapes.jsonl").read_text().splitlines()]
    for sample in samples:
        doc = docs[sample["doc_id"]]
        assert sample["filtered_resps"] == solo_answer(model, processor, doc) == doc["answer"]


def test_model_args_and_gen_kwargs_reach_generate():
    """--model_args decoding settings are defaults; a task's (or --gen_kwargs') settings override them per request
    (each request reaches the batching engine's `start_decoding`, which takes generate()'s arguments)."""
    lm = Dimple.create_from_arg_string("steps=3,alg_p_threshold=0.5,alg=topk_margin", {"batch_size": 2, "device": "cpu"})
    assert lm.batch_size == 2
    calls = []
    start_decoding = lm.model.start_decoding

    def spy(**kwargs):
        calls.append({key: value for key, value in kwargs.items() if key not in ("input_ids", "attention_mask")})
        return start_decoding(**kwargs)

    lm.model.start_decoding = spy
    chats = [lm.conversation("Colour?", [Image.new("RGB", (64, 48), (200, 30, 30))]), lm.conversation("Hi", [])]
    task_kwargs = {"max_new_tokens": 4, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False,
                   "alg_p_threshold": 0.9, "until": ["\n"]}
    answers = lm.generate_batch(chats, task_kwargs)
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
    call = calls[0]
    assert (call["steps"], call["alg"], call["alg_p_threshold"]) == (3, "topk_margin", 0.9)
    assert (call["max_new_tokens"], call["temperature"], call["top_p"]) == (4, 0.0, 1.0)
    assert not {"num_beams", "do_sample", "until"} & set(call)


def test_a_batch_holding_an_empty_answer_is_answered():
    """A blank picture makes the bundled model answer with end-of-text first; its row is '' and the batch goes on."""
    lm = Dimple.create_from_arg_string("", {"batch_size": 2, "device": "cpu"})
    blank, red = Image.new("RGB", (300, 300), "white"), Image.new("RGB", (64, 48), (200, 30, 30))
    chats = [lm.conversation("Describe the image.", [blank]), lm.conversation("Colour?", [red])]
    answers = lm.generate_batch(chats, {"max_new_tokens": 32, "until": ["\n\n"]})
    assert answers[0] == "" and len(answers) == 2 and isinstance(answers[1], str)


def test_task_settings_map_to_dimple_or_raise():
    assert decoding_kwargs({"until": "\n\n", "top_p": 0, "temperature": None, "image_aspect_ratio": "original"}) == (
        {}, ["\n\n"]
    )
    with pytest.raises(ValueError, match="num_beams=4"):
        decoding_kwargs({"num_beams": 4})
    with pytest.raises(ValueError, match=r"Unknown model_args \['stepz'\]"):
        Dimple(stepz=8)


def test_images_are_pre_resized_like_the_reference_evaluation():
    assert min(regularize_image(Image.new("RGB", (10, 300)), 3136, 50176).size) == 28
    large = regularize_image(Image.new("RGB", (2000, 1000)), 3136, 50176)
    assert large.width * large.height <= 50176 and abs(large.width / large.height - 2) < 0.02
    wide = regularize_image(Image.new("RGB", (28 * 300, 28)), 28 * 28, 28 * 28 * 400)
    assert max(wide.size) / min(wide.size) <= 200


def test_interleaved_images_stand_at_their_markers():
    lm = Dimple.__new__(Dimple)  # the conversation builder only needs these settings
    lm.regularize_images, lm.interleave_visuals, lm.system_prompt = False, True, None
    first, second = Image.new("RGB", (56, 56), "red"), Image.new("RGB", (56, 56), "blue")
    content = lm.conversation("Compare <image 2> with <image 1>.", [first, second])[0]["content"]
    assert [part.get("text") or part["image"] for part in content] == ["Compare", second, "with", first, "."]


def test_the_readme_paper_commands_name_real_tasks_and_valid_settings():
    from lmms_eval.tasks import TaskManager

    script = evaluation_blocks()[1]
    variables = dict(line.split("=", 1) for line in script.splitlines() if line and not line.startswith("lmms-eval"))
    variables = {key: value.strip('"') for key, value in variables.items()}
    known = set(TaskManager().all_tasks)
    commands = [line for line in script.splitlines() if line.startswith("lmms-eval")]
    assert len(commands) == 3
    for line in commands:
        gen = variables["GEN"]
        if "${GEN/max_new_tokens=8,steps=8/max_new_tokens=64,steps=64}" in line:
            gen = gen.replace("max_new_tokens=8,steps=8", "max_new_tokens=64,steps=64")
        words = shlex.split(line.replace("$ARGS", variables["ARGS"]))
        tasks = words[words.index("--tasks") + 1].split(",")
        assert set(tasks) <= known, set(tasks) - known
        model_args = simple_parse_args_string(words[words.index("--model_args") + 1])
        assert model_args["pretrained"] == "Dimple-7B"
        settings, _ = decoding_kwargs(simple_parse_args_string(gen))
        assert settings["decoding_pipeline"] == "dream" and settings["alg_p_threshold"] == 0.0
        DimpleModel.generation_config_class(**settings).validate()
