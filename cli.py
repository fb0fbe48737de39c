"""The `dimple` command.

`dimple generate`: answer a prompt about images by diffusion decoding (default: the bundled tiny checkpoint), with a
progress bar over denoising steps, statistics, and optionally a GIF/HTML picture of the denoising.
`dimple install-code`: switch a downloaded Dimple checkpoint folder to this implementation's remote code.
User errors end with one line on stderr and exit code 2.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

USER_ERROR = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dimple", description="Discrete-diffusion multimodal generation.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("generate", help="answer a prompt about zero or more images")
    run.add_argument("--model", help="local folder or Hub id (default: the bundled tiny checkpoint)")
    run.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    run.add_argument("--prompt", required=True)
    run.add_argument("--max-new-tokens", type=int, default=32, help="answer length (ignored with --template)")
    run.add_argument("--steps", type=int, default=None, help="maximum denoising steps (default: answer length)")
    run.add_argument("--threshold", type=float, default=0.95, help="confident-decoding threshold (0 disables)")
    run.add_argument("--no-cache", action="store_true", help="recompute the prompt at every step")
    run.add_argument(
        "--template",
        help="structure prior: answer text with <|mask|> slots to fill; the rest is fixed and sets the length",
    )
    run.add_argument("--gif", help="write an animated GIF of the denoising steps to this file")
    run.add_argument("--html", help="write a self-contained HTML page of the denoising steps to this file")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    install = commands.add_parser(
        "install-code", help="write this implementation's remote code and auto_map into a Dimple checkpoint folder"
    )
    install.add_argument("snapshot", help="local checkpoint folder, e.g. a download of rp-yu/Dimple-7B")
    install.add_argument("--out", help="make a new folder (weights symlinked) instead of changing SNAPSHOT")
    return parser.parse_args(argv)


class StepProgress:
    """A draft streamer (`put_draft` is called after every denoising step) that drives a tqdm bar on stderr."""

    def __init__(self, total: int, disable: bool):
        self.bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr, disable=disable, leave=True)

    def put(self, value: torch.Tensor) -> None:
        """Prompt and final ids arrive here; the bar only counts steps."""

    def put_draft(self, canvas: torch.Tensor) -> None:
        self.bar.update(1)

    def end(self) -> None:
        # Confident decoding usually finishes before the step budget: show the steps actually taken.
        self.bar.total = self.bar.n
        self.bar.refresh()
        self.bar.close()


def load_images(paths: list[str]) -> list[Image.Image]:
    images = []
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"image file not found: {path}; check the path given to --image")
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(
                f"cannot read image {path}: {error}; pass a PNG, JPEG or other Pillow-readable file"
            ) from error
    return images


def load_model(name: str | None):
    """Model and processor from a folder or Hub id, or the bundled tiny checkpoint when `name` is None."""
    from transformers import AutoModel, AutoProcessor

    from .modeling_dimple import DimpleModel
    from .processing_dimple import DimpleProcessor
    from .tiny_checkpoint import BUNDLED_CHECKPOINT

    if name is None:
        model = DimpleModel.from_pretrained(BUNDLED_CHECKPOINT).eval()
        return model, DimpleProcessor.from_pretrained(BUNDLED_CHECKPOINT)
    if not Path(name).exists() and name.count("/") != 1:
        raise ValueError(f"model not found: {name} is neither a folder nor a Hub id (owner/name)")
    try:
        model = AutoModel.from_pretrained(name, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=True)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"cannot load model {name}: {first_line} Pass a Dimple checkpoint folder or Hub id to --model."
        ) from error
    return model, processor


def response_template(text: str, tokenizer) -> torch.Tensor:
    """Template ids from text; `<|mask|>` marks the slots to fill."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if not bool((ids == tokenizer.mask_token_id).any()):
        raise ValueError(
            f"the template has no {tokenizer.mask_token} slot to fill; write {tokenizer.mask_token} where the "
            'model should write, e.g. --template \'{"colour": "<|mask|><|mask|>"}\''
        )
    return ids


def generate(args: argparse.Namespace) -> str:
    from .visualize import render_gif, render_html

    images = load_images(args.image)
    for flag, path in (("--gif", args.gif), ("--html", args.html)):
        if path and not Path(path).resolve().parent.is_dir():
            raise ValueError(f"the folder for {flag} {path} does not exist; create it or choose another path")
    if args.quiet:
        transformers_logging.disable_progress_bar()
    model, processor = load_model(args.model)
    template = response_template(args.template, processor.tokenizer) if args.template else None
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": args.prompt}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )
    answer_len = template.numel() if template is not None else args.max_new_tokens
    progress = StepProgress(total=args.steps or answer_len, disable=args.quiet)
    want_history = bool(args.gif or args.html)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            steps=args.steps,
            alg_p_threshold=args.threshold,
            use_cache=not args.no_cache,
            response_template=template,
            streamer=progress,
            output_history=want_history,
            return_dict_in_generate=True,
        )
    seconds = time.perf_counter() - start
    prompt_length = inputs["input_ids"].shape[1]
    answer_ids = out.sequences[:, prompt_length:]
    if template is None:
        answer = processor.post_process_image_text_to_text(answer_ids)[0]
    else:
        # A template's fixed text may follow slots the model filled with <|endoftext|>: drop those, don't cut.
        answer = processor.batch_decode(answer_ids, skip_special_tokens=True)[0]
    picture = dict(
        history=out.history, tokenizer=processor.tokenizer, mask_token_id=model.config.mask_token_id,
        prompt_length=prompt_length, template=template,
    )
    if args.gif:
        render_gif(args.gif, **picture)
    if args.html:
        render_html(path=args.html, **picture)
    stats = (
        f"forward passes: {out.num_forward_passes}, tokens per forward: {float(out.tokens_per_forward[0]):.2f}, "
        f"seconds: {seconds:.2f}"
    )
    return f"{answer}\n[{stats}]"


def install(args: argparse.Namespace) -> str:
    from .remote_code import install_code

    written = install_code(args.snapshot, args.out)
    folder = written[0].parent
    lines = [f"wrote {path.name}" for path in written]
    lines.append(f"load it with AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = {"generate": generate, "install-code": install}[args.command]
    try:
        sys.stdout.write(command(args) + "\n")
    except (ValueError, TypeError) as error:
        sys.stderr.write(f"dimple: error: {error}\n")
        return USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
