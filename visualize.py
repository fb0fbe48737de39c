"""Pictures of diffusion decoding: how a generation's answer canvas fills in, step by step.

`generate(..., output_history=True, return_dict_in_generate=True)` records the sequence after every step;
`denoising_cells` turns that history into what to draw, step by step, and both renderers draw its result: an
animated GIF (Pillow, one frame per step) or a self-contained HTML page (inline CSS/JS, a slider over steps). Masks
are grey, tokens fixed by a structure prior are blue and underlined, tokens committed at the step shown are
highlighted. Files are replaced atomically (never left half-written).
"""

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .atomic_write import replacing, write_atomically

MASK_FILL = (205, 205, 205)
NEW_FILL = (255, 224, 102)
PRIOR_INK = (25, 90, 200)
INK = (20, 20, 20)
PAPER = (255, 255, 255)


@dataclass(frozen=True)
class Cell:
    """One answer position at one step: its text and how to draw it."""

    text: str
    masked: bool
    prior: bool
    new: bool


def answer_steps(
    history: Sequence[torch.Tensor], prompt_length: int = 0, row: int = 0
) -> list[list[int]]:
    """Answer ids after each step, from `generate`'s history (full sequences) or from answer-only tensors.

    Entries may be (batch, seq) (row `row` is taken) or (seq,); the first `prompt_length` ids are dropped.
    """
    if len(history) == 0:
        raise ValueError(
            "The history is empty; generate with output_history=True and return_dict_in_generate=True."
        )
    steps = []
    for entry in history:
        ids = torch.as_tensor(entry)
        if ids.ndim == 2:
            ids = ids[row]
        if ids.ndim != 1:
            raise ValueError(
                f"History entries must be (seq,) or (batch, seq) id tensors, got shape {tuple(ids.shape)}."
            )
        steps.append([int(token) for token in ids[prompt_length:]])
    lengths = {len(step) for step in steps}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(
            f"Every step must hold the same non-empty answer, got lengths {sorted(lengths)}; check prompt_length."
        )
    return steps


def prior_positions(template: torch.Tensor | Sequence[int] | None, mask_token_id: int, length: int) -> list[bool]:
    """True where a structure-prior template fixes the token (anything that is not a mask slot)."""
    if template is None:
        return [False] * length
    ids = [int(token) for token in torch.as_tensor(template).reshape(-1)]
    if len(ids) != length:
        raise ValueError(f"The template has {len(ids)} tokens but the answer has {length}; pass the template used.")
    return [token != mask_token_id for token in ids]


def token_text(tokenizer, token_id: int) -> str:
    """Printable text of one token: decoded, with line breaks and tabs made visible."""
    text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return text.replace("\n", "\u21b5").replace("\t", "\u21e5") or "\u2205"


def denoising_cells(
    history: Sequence[torch.Tensor],
    tokenizer,
    mask_token_id: int | None = None,
    prompt_length: int = 0,
    template: torch.Tensor | Sequence[int] | None = None,
    row: int = 0,
) -> list[list[Cell]]:
    """Per step, per answer position: what to draw. The shared input of both renderers."""
    mask_id = tokenizer.mask_token_id if mask_token_id is None else mask_token_id
    if mask_id is None:
        raise ValueError("The tokenizer has no mask token; pass mask_token_id (model.config.mask_token_id).")
    steps = answer_steps(history, prompt_length, row)
    prior = prior_positions(template, mask_id, len(steps[0]))
    frames, before = [], [mask_id if not fixed else None for fixed in prior]
    for ids in steps:
        frames.append([
            Cell(
                text="" if token == mask_id else token_text(tokenizer, token),
                masked=token == mask_id,
                prior=prior[i],
                new=token != mask_id and not prior[i] and before[i] == mask_id,
            )
            for i, token in enumerate(ids)
        ])
        before = ids
    return frames


def load_font(size: int) -> ImageFont.ImageFont:
    """DejaVu Sans Mono when the system has it (wide Unicode coverage), else Pillow's built-in font."""
    try:
        return ImageFont.truetype("DejaVuSansMono.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def render_gif(
    frames: list[list[Cell]], path: str | Path, width: int = 720, font_size: int = 16, frame_ms: int = 400
) -> Path:
    """Write an animated GIF with one frame per step of `frames` (from `denoising_cells`); returns the path.

    Each position keeps one place across frames (its widest text decides), so tokens appear where they stay.
    """
    font = load_font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, gap, line = 10, 4, font_size + 10
    mask_width = probe.textlength("\u2591\u2591", font=font)
    cell_widths = [
        max(mask_width, *(probe.textlength(frame[i].text, font=font) for frame in frames)) + 6
        for i in range(len(frames[0]))
    ]
    places, x, y = [], pad, pad + line
    for cell_width in cell_widths:
        if x + cell_width > width - pad and x > pad:
            x, y = pad, y + line
        places.append((x, y, cell_width))
        x += cell_width + gap
    height = y + line + pad

    images = []
    for number, frame in enumerate(frames, start=1):
        image = Image.new("RGB", (width, height), PAPER)
        draw = ImageDraw.Draw(image)
        masks_left = sum(cell.masked for cell in frame)
        draw.text((pad, pad), f"step {number}/{len(frames)}   masks left: {masks_left}", fill=INK, font=font)
        for cell, (left, top, cell_width) in zip(frame, places):
            box = (left, top, left + cell_width, top + line - 4)
            if cell.masked:
                draw.rectangle(box, fill=MASK_FILL)
                continue
            if cell.new:
                draw.rectangle(box, fill=NEW_FILL)
            ink = PRIOR_INK if cell.prior else INK
            draw.text((left + 3, top + 2), cell.text, fill=ink, font=font)
            if cell.prior:
                draw.line((left + 2, box[3] - 1, box[2] - 2, box[3] - 1), fill=PRIOR_INK, width=2)
        images.append(image)
    path = Path(path)
    with replacing(path) as temporary:
        images[0].save(
            temporary, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0, disposal=1
        )
    return path


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #141414; }
.step { display: none; font-family: ui-monospace, monospace; line-height: 2.1; }
.step.shown, body.all .step { display: block; }
body.all .step { border-bottom: 1px solid #eee; }
.tok { padding: 2px 3px; margin-right: 2px; border-radius: 3px; white-space: pre; }
.mask { background: #cdcdcd; color: #cdcdcd; }
.new { background: #ffe066; }
.prior { color: #195ac8; text-decoration: underline 2px; }
.label { color: #777; font-size: 0.85em; margin-right: 0.6em; }
.legend span { margin-right: 1em; }
"""

HTML_SCRIPT = """
const slider = document.getElementById('slider');
const label = document.getElementById('at');
function show(k) {
  document.querySelectorAll('.step').forEach(el => el.classList.toggle('shown', el.dataset.step === String(k)));
  label.textContent = k;
}
slider.addEventListener('input', () => show(slider.value));
document.getElementById('all').addEventListener('change', e => document.body.classList.toggle('all', e.target.checked));
show(slider.value);
"""


def render_html(
    frames: list[list[Cell]], path: str | Path | None = None, title: str = "Dimple denoising"
) -> str:
    """A self-contained HTML page (no external assets) of `frames` (from `denoising_cells`): a slider over steps, or
    every step as a row.

    Returns the page; also writes it to `path` when given.
    """
    rows = []
    for number, frame in enumerate(frames, start=1):
        spans = []
        for cell in frame:
            classes = ["tok"] + [name for name, on in (("mask", cell.masked), ("new", cell.new),
                                                        ("prior", cell.prior)) if on]
            text = "\u2591\u2591" if cell.masked else cell.text
            spans.append(f'<span class="{" ".join(classes)}">{html.escape(text)}</span>')
        masks_left = sum(cell.masked for cell in frame)
        rows.append(
            f'<div class="step" data-step="{number}"><span class="label">step {number} '
            f'({masks_left} masks left)</span>{"".join(spans)}</div>'
        )
    last = len(frames)
    page = (
        f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
        f"<style>{HTML_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
        f'<p><input type="range" id="slider" min="1" max="{last}" value="{last}"> step <span id="at">{last}</span>'
        f' of {last} <label><input type="checkbox" id="all"> all steps</label></p>\n'
        '<p class="legend"><span class="tok mask">\u2591\u2591</span>mask <span class="tok new">new</span>'
        'committed at this step <span class="tok prior">fixed</span>structure prior</p>\n'
        + "\n".join(rows)
        + f"\n<script>{HTML_SCRIPT}</script>\n</body></html>\n"
    )
    if path is not None:
        write_atomically(path, page)
    return page
