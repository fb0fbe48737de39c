"""Denoising pictures: one GIF frame / HTML row per step, masks grey, prior tokens marked, no external assets."""

import re
import resource

import pytest
import torch
from PIL import Image

from dimple.tiny.build import build_tiny_model, build_tiny_processor
from dimple.visualize import denoising_cells, render_gif, render_html


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_processor().tokenizer


def handmade_history(tokenizer) -> tuple[list[torch.Tensor], list[int]]:
    """Full sequences (prompt of 3 ids + answer of 4) over 3 steps, and the final answer ids."""
    mask = tokenizer.mask_token_id
    words = tokenizer("The cat is red", add_special_tokens=False).input_ids[:4]
    prompt = tokenizer("Hi", add_special_tokens=False).input_ids[:1] * 3
    answers = [[mask, words[1], mask, mask], [words[0], words[1], mask, words[3]], words]
    return [torch.tensor([prompt + answer]) for answer in answers], words


def test_cells_mark_masks_new_tokens_and_priors(tokenizer):
    history, words = handmade_history(tokenizer)
    template = torch.tensor([tokenizer.mask_token_id, words[1], tokenizer.mask_token_id, tokenizer.mask_token_id])
    frames = denoising_cells(history, tokenizer, prompt_length=3, template=template)
    assert [[cell.masked for cell in frame] for frame in frames] == [
        [True, False, True, True], [False, False, True, False], [False] * 4
    ]
    assert [[cell.new for cell in frame] for frame in frames] == [
        [False] * 4, [True, False, False, True], [False, False, True, False]
    ]
    assert all(frame[1].prior and not frame[0].prior for frame in frames)
    assert "".join(cell.text for cell in frames[-1]) == tokenizer.decode(words)


def test_gif_has_one_frame_per_step_with_grey_masks(tokenizer, tmp_path):
    history, _ = handmade_history(tokenizer)
    path = render_gif(denoising_cells(history, tokenizer, prompt_length=3), tmp_path / "steps.gif")
    with Image.open(path) as gif:
        assert gif.n_frames == 3
        grey_pixels = []
        for index in range(3):
            gif.seek(index)
            counts = {colour: count for count, colour in gif.convert("RGB").getcolors(maxcolors=1 << 16)}
            grey_pixels.append(counts.get((205, 205, 205), 0))
    # Three masks, then one, then none (anti-aliased text may leave a few grey pixels).
    assert grey_pixels[0] > 2 * grey_pixels[1] and grey_pixels[1] > grey_pixels[2] + 100


def test_html_shows_every_step_and_the_final_tokens_without_external_assets(tokenizer, tmp_path):
    history, words = handmade_history(tokenizer)
    page = render_html(denoising_cells(history, tokenizer, prompt_length=3), tmp_path / "steps.html")
    assert (tmp_path / "steps.html").read_text(encoding="utf-8") == page
    assert re.findall(r'data-step="(\d+)"', page) == ["1", "2", "3"]
    last_row = page.split('data-step="3"')[1].split("</div>")[0]
    for word in words:
        assert tokenizer.decode([word]).replace(" ", "") in last_row
    assert 'class="tok mask"' in page.split('data-step="2"')[1].split("</div>")[0]
    assert not re.search(r"https?://|src=|href=|@import", page)


def test_real_generation_history_renders(tokenizer, tmp_path):
    processor = build_tiny_processor()
    model = build_tiny_model(processor)
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": "Describe the picture."}], add_generation_prompt=True, tokenize=True,
        return_dict=True, return_tensors="pt",
    )
    template = tokenizer('Answer: "<|mask|><|mask|><|mask|>".', add_special_tokens=False, return_tensors="pt")
    template = template.input_ids[0]
    out = model.generate(**inputs, response_template=template, alg_p_threshold=0, output_history=True,
                         return_dict_in_generate=True)
    frames = denoising_cells(out.history, tokenizer, prompt_length=inputs["input_ids"].shape[1], template=template)
    with Image.open(render_gif(frames, tmp_path / "real.gif")) as gif:
        assert gif.n_frames == len(out.history) == out.num_forward_passes
    page = render_html(frames)
    rows = page.split('<div class="step"', 1)[1]  # after the legend
    assert rows.count('class="tok prior"') == len(out.history) * int((template != tokenizer.mask_token_id).sum())


def test_bad_inputs_are_refused_clearly(tokenizer):
    history, _ = handmade_history(tokenizer)
    with pytest.raises(ValueError, match="history is empty"):
        denoising_cells([], tokenizer)
    with pytest.raises(ValueError, match="template has 2 tokens but the answer has 4"):
        denoising_cells(history, tokenizer, prompt_length=3, template=[1, 2])
    with pytest.raises(ValueError, match="same non-empty answer"):
        denoising_cells(history, tokenizer, prompt_length=7)


@pytest.mark.parametrize("kind", ["gif", "html"])
def test_a_failed_write_leaves_the_previous_file_whole(tokenizer, tmp_path, kind):
    """A write that fails midway (here: a file-size limit, as on a full disk) leaves the old file as it was and no
    temporary file behind; the old code truncated the file first."""
    history, _ = handmade_history(tokenizer)
    frames = denoising_cells(history * 20, tokenizer, prompt_length=3)
    path = tmp_path / f"steps.{kind}"
    old = b"a previous picture " * 1000
    path.write_bytes(old)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        with pytest.raises(OSError, match="File too large"):
            if kind == "gif":
                render_gif(frames, path)
            else:
                render_html(frames, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert path.read_bytes() == old
    assert [entry.name for entry in tmp_path.iterdir()] == [path.name]
