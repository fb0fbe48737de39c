"""`python -m dimple.tiny build FOLDER | sync-code | train [options]`: the tiny family's three jobs."""

import argparse
import sys
from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging

from .build import save_tiny_checkpoint
from .bundled import BUNDLED_CHECKPOINT, sync_remote_code
from .train import save, summary, train


def parser() -> argparse.ArgumentParser:
    commands = argparse.ArgumentParser(prog="python -m dimple.tiny", description="The tiny Dimple family's jobs.")
    jobs = commands.add_subparsers(dest="job", required=True)
    build = jobs.add_parser("build", help="write the random tiny Dimple (model and processor) to FOLDER")
    build.add_argument("folder", type=Path)
    jobs.add_parser("sync-code", help="refresh the bundled checkpoint's copies of the package's remote-code modules")
    training = jobs.add_parser("train", help="train the bundled tiny Dimple (2 CPU threads, 2-4 minutes)")
    training.add_argument("--out", type=Path, default=BUNDLED_CHECKPOINT, help="checkpoint folder (default: bundled)")
    training.add_argument("--vision-steps", type=int, default=300)
    training.add_argument("--ar-steps", type=int, default=400)
    training.add_argument("--diffusion-steps", type=int, default=600)
    training.add_argument("--batch-size", type=int, default=16)
    training.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it)")
    return commands


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.job == "build":
        sys.stdout.write(f"{save_tiny_checkpoint(args.folder)}\n")
    elif args.job == "sync-code":
        for written in sync_remote_code():
            sys.stdout.write(f"{written}\n")
    else:
        torch.set_num_threads(args.threads)
        transformers_logging.set_verbosity_error()
        model, processor, stats = train(args.vision_steps, args.ar_steps, args.diffusion_steps, args.batch_size)
        save(model, processor, args.out)
        sys.stdout.write(f"{summary(stats)}saved to {args.out}\n")


if __name__ == "__main__":
    main()
