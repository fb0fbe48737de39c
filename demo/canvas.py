"""The answer canvas while it denoises: a draft streamer that records it, and the HTML the page shows.

`CanvasRecorder` is a draft streamer (`generate` calls `put_draft` with the answer canvas after every step). It keeps
every draft (the run's history, for the GIF/HTML export through `dimple.visualize`) and the step at which each slot
was committed, and hands each draft to a callback. `canvas_html` draws one moment: masked slots as grey masks,
committed tokens where they landed, shaded by their step (blue early, orange late; a legend says so), template
tokens blue and underlined. The outer element carries the step and the number of masks left as data attributes,
so a browser test can read the progress without guessing from timing.
"""

import html
from collections.abc import Callable

import torch

from ..visualize import token_text

CANVAS_STYLE = """
.dimple-canvas { font-family: ui-monospace, monospace; line-height: 2.2; }
.dimple-canvas .tok { padding: 2px 3px; margin-right: 2px; border-radius: 3px; white-space: pre; }
.dimple-canvas .mask { background: #cdcdcd; color: #8a8a8a; }
.dimple-canvas .prior { color: #195ac8; text-decoration: underline 2px; }
.dimple-canvas .progress, .dimple-canvas .legend { font-family: system-ui, sans-serif; font-size: 0.85em; color: #555; }
.dimple-canvas .legend .tok { font-family: ui-monospace, monospace; }
"""


def step_colour(step: int, total: int) -> str:
    """Background of a token committed at `step` of `total`: hue runs from blue (first step) to orange (last)."""
    share = 0.0 if total <= 1 else min(max((step - 1) / (total - 1), 0.0), 1.0)
    return f"hsl({round(210 - 180 * share)}, 85%, 82%)"


class CanvasRecorder:
    """Draft streamer for one generation of batch size 1: records drafts and commit steps, reports each draft.

    `on_draft(recorder)` runs on the decoding thread (generate's, or the batching engine's) after every step; it may
    raise to stop decoding (the page uses that when its visitor leaves).
    """

    def __init__(self, mask_token_id: int, template: torch.Tensor | None, on_draft: Callable[["CanvasRecorder"], None]):
        self.mask_token_id = mask_token_id
        self.template = template
        self.on_draft = on_draft
        self.drafts: list[torch.Tensor] = []
        self.committed_at: list[int | None] = []
        self.started = False

    @property
    def step(self) -> int:
        return len(self.drafts)

    def put(self, value: torch.Tensor) -> None:
        """The prompt (before the first step) and the final answer arrive here; only the start matters."""
        self.started = True

    def put_draft(self, canvas: torch.Tensor) -> None:
        draft = canvas[0].detach().clone()
        if not self.committed_at:
            self.committed_at = [None] * draft.numel()
        fixed = self.fixed
        for index, token in enumerate(draft.tolist()):
            if self.committed_at[index] is None and token != self.mask_token_id and not fixed[index]:
                self.committed_at[index] = self.step + 1
        self.drafts.append(draft)
        self.on_draft(self)

    def end(self) -> None:
        pass

    @property
    def fixed(self) -> list[bool]:
        """Slots the structure prior fixes (all False without a template)."""
        if self.template is None:
            return [False] * len(self.committed_at)
        return [token != self.mask_token_id for token in self.template.tolist()]

    @property
    def committed(self) -> int:
        """Answer tokens the steps committed (the structure prior's fixed tokens are not)."""
        return sum(step is not None for step in self.committed_at)

    @property
    def masks_left(self) -> int:
        return int((self.drafts[-1] == self.mask_token_id).sum()) if self.drafts else 0


def legend_html(total_steps: int) -> str:
    """What the shades mean: a mask, a few steps from first to last, a template token."""
    marks = sorted({1, (total_steps + 1) // 2, total_steps})
    swatches = "".join(
        f'<span class="tok" style="background:{step_colour(step, total_steps)}">step {step}</span>' for step in marks
    )
    return (
        f'<div class="legend"><span class="tok mask">\u2591\u2591</span> still masked &nbsp; committed at '
        f'{swatches} &nbsp; <span class="tok prior">fixed</span> structure prior</div>'
    )


def canvas_html(recorder: CanvasRecorder, tokenizer, total_steps: int, done: bool = False) -> str:
    """The canvas after the recorder's latest draft, with its progress line and the legend."""
    spans = []
    if recorder.drafts:
        fixed = recorder.fixed
        for index, token in enumerate(recorder.drafts[-1].tolist()):
            if token == recorder.mask_token_id:
                spans.append('<span class="tok mask">\u2591\u2591</span>')
                continue
            text = html.escape(token_text(tokenizer, token))
            if fixed[index]:
                spans.append(f'<span class="tok prior">{text}</span>')
            else:
                step = recorder.committed_at[index]
                spans.append(
                    f'<span class="tok" data-step="{step}" title="committed at step {step}" '
                    f'style="background:{step_colour(step, total_steps)}">{text}</span>'
                )
    state = "done" if done else "denoising"
    progress = f"step {recorder.step} of at most {total_steps}, {recorder.masks_left} masks left ({state})"
    return (
        f'<div class="dimple-canvas" data-step="{recorder.step}" data-masks="{recorder.masks_left}" '
        f'data-state="{state}"><p class="progress">{progress}</p><div class="tokens">{"".join(spans)}</div>'
        f"{legend_html(total_steps)}</div>"
    )


def idle_canvas_html(message: str = "The answer canvas appears here while Dimple decodes.") -> str:
    return f'<div class="dimple-canvas" data-step="0" data-masks="0" data-state="idle"><p class="progress">' \
           f"{html.escape(message)}</p></div>"
