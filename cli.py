"""`dimple generate`: run Dimple on a prompt and images from the command line (default: the bundled tiny model)."""

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dimple", description="Discrete-diffusion multimodal generation.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("generate", help="answer a prompt about zero or more images")
    run.add_argument("--model", help="local folder or Hub id (default: the bundled tiny checkpoint)")
    run.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    run.add_argument("--prompt", required=True)
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--steps", type=int, default=None, help="maximum denoising steps (default: max-new-tokens)")
    run.add_argument("--threshold", type=float, default=0.95, help="confident-decoding threshold (0 disables)")
    run.add_argument("--no-cache", action="store_true", help="recompute the prompt at every step")
    return parser.parse_args(argv)


def load_images(paths: list[str]) -> list[Image.Image]:
    images = []
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"image file not found: {path}")
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"cannot read image {path}: {error}") from error
    return images


def generate(args: argparse.Namespace) -> str:
    from transformers import AutoModel, AutoProcessor

    from .modeling_dimple import DimpleModel
    from .processing_dimple import DimpleProcessor
    from .tiny_checkpoint import BUNDLED_CHECKPOINT

    images = load_images(args.image)
    if args.model and not Path(args.model).exists() and args.model.count("/") != 1:
        raise ValueError(f"model not found: {args.model} is neither a folder nor a Hub id (owner/name)")
    try:
        if args.model:
            model = AutoModel.from_pretrained(args.model, trust_remote_code=True).eval()
            processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
        else:
            model = DimpleModel.from_pretrained(BUNDLED_CHECKPOINT).eval()
            processor = DimpleProcessor.from_pretrained(BUNDLED_CHECKPOINT)
    except OSError as error:
        raise ValueError(f"cannot load model {args.model}: {error}") from error
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": args.prompt}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            steps=args.steps,
            alg_p_threshold=args.threshold,
            use_cache=not args.no_cache,
            return_dict_in_generate=True,
        )
    seconds = time.perf_counter() - start
    answer = processor.post_process_image_text_to_text(out.sequences[:, inputs["input_ids"].shape[1] :])[0]
    stats = (
        f"forward passes: {out.num_forward_passes}, tokens per forward: {float(out.tokens_per_forward[0]):.2f}, "
        f"seconds: {seconds:.2f}"
    )
    return f"{answer}\n[{stats}]"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sys.stdout.write(generate(args) + "\n")
    except (ValueError, TypeError) as error:
        sys.stderr.write(f"dimple: error: {error}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
