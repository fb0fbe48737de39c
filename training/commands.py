"""`dimple assemble` and `dimple train`: their options and runners (cli.py only registers them).

Heavy imports (torch models, the Trainer) happen inside the runners, so `dimple --help` stays fast. Problems with the
user's input (parents that do not fit, missing data or images, bad settings) end as one line and exit code 2 through
the CLI's `UserError`.
"""

import argparse
from typing import Any

from .llava import MISSING_IMAGE_POLICIES

# `dimple train` options that go to transformers.TrainingArguments under the same name (dashes for underscores).
TRAINER_OPTIONS: dict[str, tuple[type, Any, str]] = {
    "learning_rate": (float, 2e-5, "peak learning rate"),
    "per_device_train_batch_size": (int, 8, "samples per device and step"),
    "gradient_accumulation_steps": (int, 1, "micro-batches per optimizer step"),
    "max_steps": (int, -1, "stop after this many optimizer steps (-1: run --num-train-epochs)"),
    "num_train_epochs": (float, 1.0, "epochs when --max-steps is not given"),
    "weight_decay": (float, 0.0, "AdamW weight decay"),
    "max_grad_norm": (float, 1.0, "gradient clipping norm"),
    "lr_scheduler_type": (str, "linear", "transformers scheduler name"),
    "save_steps": (float, 500, "write a resumable checkpoint-N folder every N steps"),
    "save_total_limit": (int, None, "keep at most this many checkpoint folders"),
    "logging_steps": (float, 10, "log the loss every N steps"),
    "seed": (int, 42, "seed of the data order, masking and padding"),
    "dataloader_num_workers": (int, 0, "data loading processes"),
    "report_to": (str, "none", "experiment tracker (none, tensorboard, wandb, ...)"),
    "deepspeed": (str, None, "DeepSpeed config JSON (the paper's runs used ZeRO stage 1)"),
}
TRAINER_FLAGS = {"bf16": "bfloat16 mixed precision"}


def trainer_settings(args: argparse.Namespace) -> dict[str, Any]:
    """TrainingArguments fields from the options; warm-up and checkpointing under the names the installed
    transformers uses (`warmup_ratio` became a float `warmup_steps`, `gradient_checkpointing` became
    `activation_checkpointing`)."""
    import dataclasses

    from transformers import TrainingArguments

    fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    settings = {name: getattr(args, name) for name in (*TRAINER_OPTIONS, *TRAINER_FLAGS)}
    if not 0.0 <= args.warmup_ratio < 1.0:
        raise ValueError(f"--warmup-ratio must lie in [0, 1), got {args.warmup_ratio}")
    settings["warmup_ratio" if "warmup_ratio" in fields else "warmup_steps"] = args.warmup_ratio
    if args.gradient_checkpointing:
        name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
        settings[name] = True
    return settings


def add_assemble_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decoder", required=True, help="Dream decoder: folder or Hub id (Dream-org/...)")
    parser.add_argument("--vision", required=True, help="Qwen2.5-VL checkpoint: folder or Hub id (Qwen/...)")
    parser.add_argument("--out", required=True, help="new folder for the Dimple checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="seed of the projector's initialisation")
    parser.add_argument("--max-shard-size", type=int, default=5, help="safetensors shard size in GB")
    parser.set_defaults(run=run_assemble)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", required=True, choices=("align", "ar", "diffusion"))
    parser.add_argument("--model", required=True, help="Dimple folder (from dimple assemble or the previous stage)")
    parser.add_argument("--data", required=True, help="LLaVA-format .json or .jsonl file")
    parser.add_argument("--image-folder", help="folder the records' image paths are relative to")
    parser.add_argument("--out", required=True, help="output folder: checkpoint-N folders and the final model")
    parser.add_argument("--skip-missing-images", action="store_true",
                        help="leave out records whose image file is missing (default: stop with an error naming it)")
    parser.add_argument("--complementary-masking", action="store_true", help="diffusion: two complementary masks")
    parser.add_argument("--time-weighting", action="store_true", help="diffusion: weight the loss by 1/t")
    parser.add_argument("--eps", type=float, default=1e-3, help="diffusion: smallest masking rate")
    parser.add_argument("--freeze-projector", action="store_true", help="ar/diffusion: keep the projector fixed")
    parser.add_argument("--pad-upper", type=int, help="fixed upper bound of the padded answer length")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"),
                        help="weights' dtype while training")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="resume from a checkpoint-N folder (alone: the newest in --out)")
    for name, (kind, default, help_text) in TRAINER_OPTIONS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=help_text)
    for name, help_text in TRAINER_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), action="store_true", help=help_text)
    parser.add_argument("--warmup-ratio", type=float, default=0.03, help="share of the steps with a linear warm-up")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in the backward pass")
    parser.set_defaults(run=run_train)


def user_error(error: Exception) -> Exception:
    from ..cli import UserError, first_line

    return UserError(first_line(error))


def run_assemble(args: argparse.Namespace) -> str:
    from .assemble import assemble

    if args.max_shard_size < 1:
        raise user_error(ValueError(f"--max-shard-size must be at least 1 (GB), got {args.max_shard_size}"))
    try:
        shard_bytes = args.max_shard_size * 1024**3
        out = assemble(args.decoder, args.vision, args.out, seed=args.seed, max_shard_size=shard_bytes)
    except (ValueError, OSError) as error:
        raise user_error(error) from error
    return f"wrote {out}\nnext: dimple train --stage align --model {out} --data DATA.json --image-folder DIR --out DIR"


def run_train(args: argparse.Namespace) -> str:
    from .stages import finish_stage, prepare_stage

    try:
        settings = trainer_settings(args)
        run = prepare_stage(
            args.model, args.data, args.out, args.stage, image_folder=args.image_folder,
            missing_images=MISSING_IMAGE_POLICIES[1] if args.skip_missing_images else MISSING_IMAGE_POLICIES[0],
            training_args=settings, complementary_masking=args.complementary_masking,
            time_weighting=args.time_weighting, eps=args.eps, freeze_projector=args.freeze_projector,
            pad_upper=args.pad_upper, resume_from_checkpoint=args.resume, dtype=args.dtype,
        )
    except (ValueError, OSError) as error:  # input problems only: training itself runs outside this block
        raise user_error(error) from error
    finish_stage(run)
    losses = [entry["loss"] for entry in run.trainer.state.log_history if "loss" in entry]
    lines = [f"stage {args.stage}: {run.trainer.state.global_step} steps on {len(run.dataset)} samples"]
    if run.dataset.skipped:
        lines.append(f"skipped {run.dataset.skipped} records whose image file is missing")
    if losses:
        lines.append(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f}")
    lines.append(f"saved the model to {run.out}")
    return "\n".join(lines)
