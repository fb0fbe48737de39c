"""The `dimple` command.

`dimple generate`: answer a prompt about images by diffusion decoding (default: the bundled tiny checkpoint), with a
progress bar over denoising steps, statistics, and optionally a GIF/HTML picture of the denoising.
`dimple install-code`: switch a downloaded Dimple checkpoint folder to this implementation's remote code.
`dimple serve`: an OpenAI-compatible server for a Dimple checkpoint (see serving/).
`dimple demo`: a Gradio chat in the browser that shows the answer canvas denoise (see demo/).
`dimple assemble` / `dimple train`: build a Dimple from its parents and train it in stages (see training/commands.py).
User errors (`UserError`: bad arguments, unreadable files, unusable checkpoints) end with one line on stderr and exit
code 2; anything else is a bug and keeps its traceback (exit code 1), which is what a bug report needs.
"""

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from .demo.command import add_arguments as add_demo_arguments, run as run_demo

USER_ERROR = 2


class UserError(Exception):
    """A mistake in what the user gave the command; raised only where input is checked, so bugs are never hidden."""


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
    run.add_argument(
        "--trust-remote-code", action="store_true",
        help="let a checkpoint whose model_type is not 'dimple' run the Python files its auto_map names (off: "
        "only this package's code runs)",
    )
    install = commands.add_parser(
        "install-code", help="write this implementation's remote code and auto_map into a Dimple checkpoint folder"
    )
    install.add_argument("snapshot", help="local checkpoint folder, e.g. a download of rp-yu/Dimple-7B")
    install.add_argument("--out", help="make a new folder (weights symlinked) instead of changing SNAPSHOT")
    from .training.commands import add_assemble_arguments, add_train_arguments

    add_assemble_arguments(
        commands.add_parser("assemble", help="build a new Dimple from a Dream decoder and a Qwen2.5-VL tower")
    )
    add_train_arguments(
        commands.add_parser("train", help="run a training stage (align, ar, diffusion) on LLaVA-format data")
    )
    # Listed for `dimple --help` only: main() hands everything after `serve` to serving's own parser.
    commands.add_parser(
        "serve", add_help=False,
        help="serve a Dimple checkpoint (default: the bundled one) with an OpenAI-compatible API (dimple serve --help)",
    )
    add_demo_arguments(commands.add_parser("demo", help="chat with a checkpoint in the browser, watching it denoise"))
    return parser.parse_args(argv)


class StepProgress:
    """A draft streamer (`put_draft` is called after every denoising step) that drives a tqdm bar on stderr."""

    def __init__(self, total: int, disable: bool):
        self.total, self.disable = total, disable
        self.bar: tqdm | None = None

    @property
    def started(self) -> bool:
        """`generate` hands over the prompt once every input check has passed, so this separates input errors from
        failures of decoding itself."""
        return self.bar is not None

    def put(self, value: torch.Tensor) -> None:
        """Prompt and final ids arrive here; the bar (drawn from now on) only counts steps."""
        if self.bar is None:
            self.bar = tqdm(
                total=self.total, desc="denoising", unit="step", file=sys.stderr, disable=self.disable, leave=True
            )

    def put_draft(self, canvas: torch.Tensor) -> None:
        self.bar.update(1)

    def end(self) -> None:
        # Confident decoding usually finishes before the step budget: show the steps actually taken.
        self.bar.total = self.bar.n
        self.bar.refresh()
        self.bar.close()


def first_line(error: BaseException) -> str:
    """The first line of an error's message (or its type's name): user errors print as one line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_images(paths: list[str]) -> list[Image.Image]:
    """Each --image read the way the processor reads any picture (`image_processing_dimple.load_image`)."""
    from .image_processing_dimple import load_image, readable_image_errors

    images = []
    for path in paths:
        if Path(path).is_dir():
            raise UserError(f"--image {path} is a folder; give an image file inside it")
        if not Path(path).is_file():
            raise UserError(f"image file not found: {path}; check the path given to --image")
        try:
            with readable_image_errors():
                images.append(load_image(path))
        except Image.DecompressionBombError as error:
            raise UserError(
                f"image {path} is too large to read safely: {first_line(error)} Downscale the picture first."
            ) from error
        except (ValueError, OSError) as error:
            raise UserError(
                f"cannot read image {path}: {first_line(error)} Pass a PNG, JPEG or other Pillow-readable file."
            ) from error
    return images


def check_settings(args: argparse.Namespace) -> None:
    """Numbers the decoder would refuse anyway, refused before the model is loaded."""
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--steps", args.steps)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    if not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold must lie in [0, 1] (0 disables confident decoding), got {args.threshold}")


def check_output_path(flag: str, path: str | None) -> None:
    """--gif/--html must name a writable file, checked before the model runs rather than after."""
    if not path:
        return
    target = Path(path).resolve()
    if not target.parent.is_dir():
        raise UserError(f"the folder for {flag} {path} does not exist; create it or choose another path")
    if target.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name, e.g. {Path(path) / 'steps'}")
    if not os.access(target.parent, os.W_OK):
        raise UserError(f"cannot write {flag} {path}: no write permission in {target.parent}; choose another path")


def load_model(name: str | None, trust_remote_code: bool = False):
    """Model and processor from a folder or Hub id, or the bundled tiny checkpoint when `name` is None.

    Without `trust_remote_code` only this package's classes are used and a non-Dimple checkpoint is refused; with
    it, the Auto classes may import the Python files the checkpoint's auto_map names (for a model_type other than
    'dimple': with the package imported, Dimple checkpoints still get the package's classes).
    """
    from transformers import AutoConfig, AutoModel, AutoProcessor

    from .modeling_dimple import DimpleModel
    from .processing_dimple import DimpleProcessor
    from .tiny.bundled import BUNDLED_CHECKPOINT

    if name is None:
        model = DimpleModel.from_pretrained(BUNDLED_CHECKPOINT).eval()
        return model, DimpleProcessor.from_pretrained(BUNDLED_CHECKPOINT)
    if not Path(name).exists() and name.count("/") != 1:
        raise UserError(f"model not found: {name} is neither a folder nor a Hub id (owner/name)")
    try:
        if trust_remote_code:
            model = AutoModel.from_pretrained(name, trust_remote_code=True).eval()
            return model, AutoProcessor.from_pretrained(name, trust_remote_code=True)
        config = AutoConfig.from_pretrained(name, trust_remote_code=False)
        if config.model_type != DimpleModel.config_class.model_type:
            raise UserError(
                f"cannot load model {name}: it holds a {config.model_type!r} checkpoint, not a Dimple one; pass "
                "--trust-remote-code to run the code its auto_map names, if you trust it."
            )
        model = DimpleModel.from_pretrained(name, config=config).eval()
        return model, DimpleProcessor.from_pretrained(name)
    except (OSError, ValueError, TypeError, ImportError) as error:  # ImportError: the folder's own code failed
        raise UserError(
            f"cannot load model {name}: {first_line(error)} Pass a Dimple checkpoint folder or Hub id to --model."
        ) from error


def response_template(text: str, tokenizer) -> torch.Tensor:
    """Template ids from text; `<|mask|>` marks the slots to fill."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if not bool((ids == tokenizer.mask_token_id).any()):
        raise UserError(
            f"the template has no {tokenizer.mask_token} slot to fill; write {tokenizer.mask_token} where the "
            'model should write, e.g. --template \'{"colour": "<|mask|><|mask|>"}\''
        )
    return ids


def chat_inputs(processor: Any, images: list, prompt: str) -> dict:
    """One user turn (the images, then the prompt) as model inputs; the processor's refusals become one line."""
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": prompt}]
    try:
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt",
        )
    except ValueError as error:  # the processor's checks of the pictures and prompt
        raise UserError(first_line(error)) from error


def write_denoising_pictures(renderers: list[tuple[str | None, Callable]], frames: list) -> None:
    """Render the denoising steps to every requested path (`--gif`, `--html`); a write failure is one line."""
    for path, render in renderers:
        if path:
            try:
                render(frames, path)
            except OSError as error:
                raise UserError(f"cannot write {path}: {error.strerror or error}") from error


def generate(args: argparse.Namespace) -> str:
    from .visualize import denoising_cells, render_gif, render_html

    check_settings(args)
    images = load_images(args.image)
    check_output_path("--gif", args.gif)
    check_output_path("--html", args.html)
    if args.quiet:
        transformers_logging.disable_progress_bar()
    model, processor = load_model(args.model, args.trust_remote_code)
    template = response_template(args.template, processor.tokenizer) if args.template else None
    inputs = chat_inputs(processor, images, args.prompt)
    answer_len = template.numel() if template is not None else args.max_new_tokens
    progress = StepProgress(total=args.steps or answer_len, disable=args.quiet)
    want_history = bool(args.gif or args.html)
    start = time.perf_counter()
    try:
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
    except (ValueError, TypeError) as error:
        if progress.started:  # decoding itself failed: a bug, keep the traceback
            raise
        raise UserError(first_line(error)) from error
    seconds = time.perf_counter() - start
    prompt_length = inputs["input_ids"].shape[1]
    answer_ids = out.sequences[:, prompt_length:]
    if template is None:
        answer = processor.post_process_image_text_to_text(answer_ids)[0]
    else:
        # A template's fixed text may follow slots the model filled with <|endoftext|>: drop those, don't cut.
        answer = processor.batch_decode(answer_ids, skip_special_tokens=True)[0]
    if want_history:
        frames = denoising_cells(out.history, processor.tokenizer, model.config.mask_token_id, prompt_length, template)
        write_denoising_pictures([(args.gif, render_gif), (args.html, render_html)], frames)
    stats = (
        f"forward passes: {out.num_forward_passes}, tokens per forward: {float(out.tokens_per_forward[0]):.2f}, "
        f"seconds: {seconds:.2f}"
    )
    return f"{answer}\n[{stats}]"


def install(args: argparse.Namespace) -> str:
    from .remote_code import InstallError, install_code

    try:
        written = install_code(args.snapshot, args.out)
    except InstallError as error:
        raise UserError(str(error)) from error
    folder = written[0].parent
    lines = [f"wrote {path.name}" for path in written]
    lines.append(f"load it with AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from .serving import serve

        return serve(argv[1:])
    args = parse_args(argv)
    commands = {"generate": generate, "install-code": install, "demo": run_demo}
    command = getattr(args, "run", None) or commands[args.command]
    try:
        sys.stdout.write(command(args) + "\n")
    except UserError as error:
        sys.stderr.write(f"dimple: error: {first_line(error)}\n")
        return USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
