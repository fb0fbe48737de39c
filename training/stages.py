"""The paper's three training stages as one call each (`dimple train --stage align|ar|diffusion`).

* ``align``: the projector only, autoregressive (causal attention, next-token loss); decoder, LM head and vision
  tower are frozen and stay bit-for-bit unchanged. Dimple trained it on LLaVA's alignment set.
* ``ar``: projector, decoder and LM head, autoregressive (instruction tuning on LLaVA-NeXT's data).
* ``diffusion``: projector, decoder and LM head with the diffusion objective (bidirectional attention, answer
  tokens masked with probability t ~ U(eps, 1)); complementary masking and 1/t weighting are options. The released
  run also froze the projector here (`freeze_projector=True`).

The vision tower is frozen in every stage, as in the paper. Each stage reads a Dimple folder (from `dimple assemble`
or the previous stage) and LLaVA-format data, trains with `DimpleTrainer` (its progress bar, its resumable
`checkpoint-N` folders in `out`), and saves the final model into `out` with the remote code, loadable with the Auto
classes.
"""

import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..modeling_dimple import DimpleModel
from ..processing_dimple import DimpleProcessor
from ..tiny.bundled import write_checkpoint
from .collator import DimpleSFTCollator
from .llava import LlavaDataset
from .trainer import DimpleTrainer

PARTS = ("visual", "img_projector", "model", "lm_head")


@dataclass(frozen=True)
class Stage:
    objective: str
    trained: tuple[str, ...]


STAGES = {
    "align": Stage("ar", ("img_projector",)),
    "ar": Stage("ar", ("img_projector", "model", "lm_head")),
    "diffusion": Stage("diffusion", ("img_projector", "model", "lm_head")),
}


def trained_parts(stage: str, freeze_projector: bool = False) -> tuple[str, ...]:
    if stage not in STAGES:
        raise ValueError(f"Unknown stage {stage!r}; choose one of {', '.join(STAGES)}.")
    if freeze_projector and stage == "align":
        raise ValueError("The align stage trains the projector only; freezing it leaves nothing to train.")
    return tuple(part for part in STAGES[stage].trained if not (freeze_projector and part == "img_projector"))


def freeze_for_stage(model: nn.Module, parts: Sequence[str]) -> None:
    """Only the named top-level parts of the Dimple train; every other parameter is frozen."""
    for part in PARTS:
        for parameter in getattr(model, part).parameters():
            parameter.requires_grad_(part in parts)


class IndexedSamples(Dataset):
    """The dataset's samples with their index, which `BatchSeededCollator` seeds the answer padding from."""

    def __init__(self, samples: Dataset) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.samples[index], "index": index}


class BatchSeededCollator(DimpleSFTCollator):
    """`DimpleSFTCollator` whose padding lengths depend on the seed and the batch's sample indices only.

    The plain collator draws them from one running generator, which the Trainer does not checkpoint (and whose
    draws for skipped batches a resumed run never makes): a resumed run would pad differently. Seeding each batch
    from its contents makes a resumed run see exactly the batches of an uninterrupted one.
    """

    def __init__(self, processor: Any, pad_upper: int | None = None, seed: int = 0) -> None:
        super().__init__(processor, pad_upper, seed)
        self.seed = seed

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        self.rng = random.Random(f"{self.seed}:{[sample.get('index') for sample in samples]}")
        return super().__call__(samples)


@dataclass
class StageRun:
    trainer: DimpleTrainer
    dataset: LlavaDataset
    out: Path
    processor: DimpleProcessor
    resume: str | None


def train_stage(
    model_dir: str | os.PathLike,
    data_file: str | os.PathLike,
    out: str | os.PathLike,
    stage: str,
    **options: Any,
) -> StageRun:
    """Run one stage on a Dimple folder and save the result (with remote code) into `out`; see `prepare_stage` for
    the options."""
    return finish_stage(prepare_stage(model_dir, data_file, out, stage, **options))


def prepare_stage(
    model_dir: str | os.PathLike,
    data_file: str | os.PathLike,
    out: str | os.PathLike,
    stage: str,
    image_folder: str | os.PathLike | None = None,
    missing_images: str = "error",
    training_args: Mapping[str, Any] | None = None,
    complementary_masking: bool = False,
    time_weighting: bool = False,
    eps: float = 1e-3,
    freeze_projector: bool = False,
    pad_upper: int | None = None,
    resume_from_checkpoint: str | bool | None = None,
    dtype: str = "float32",
) -> StageRun:
    """Check every input (stage settings, data, images, model, checkpoint to resume) and build the Trainer; a
    problem is a `ValueError` naming it, before any step runs.

    `training_args` are `transformers.TrainingArguments` fields (learning_rate, max_steps, bf16, save_steps, ...);
    `output_dir` is `out`, where the Trainer also writes its `checkpoint-N` folders. `resume_from_checkpoint` is a
    checkpoint folder, or True for the newest in `out`. `dtype` is the weights' dtype while training ("float32"
    with `bf16=True` is mixed precision; "bfloat16" trains bf16 weights; "auto" keeps the checkpoint's).
    """
    parts = trained_parts(stage, freeze_projector)
    if STAGES[stage].objective != "diffusion" and (complementary_masking or time_weighting):
        raise ValueError(f"complementary masking and time weighting belong to the diffusion stage, not {stage!r}.")
    resume = checkpoint_to_resume(out, resume_from_checkpoint)
    dataset = LlavaDataset(data_file, image_folder, missing_images)
    if not Path(model_dir, "config.json").is_file():
        raise ValueError(f"--model {model_dir} is not a Dimple folder (no config.json); run dimple assemble first")
    model = DimpleModel.from_pretrained(model_dir, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    processor = DimpleProcessor.from_pretrained(model_dir)
    freeze_for_stage(model, parts)
    settings = {"report_to": "none", "save_strategy": "steps", **(training_args or {})}
    args = TrainingArguments(output_dir=str(out), **settings)
    trainer = DimpleTrainer(
        model=model, args=args, train_dataset=IndexedSamples(dataset),
        data_collator=BatchSeededCollator(processor, pad_upper, seed=args.seed), objective=STAGES[stage].objective,
        complementary_masking=complementary_masking, time_weighting=time_weighting, eps=eps,
    )
    return StageRun(trainer, dataset, Path(out), processor, resume)


def checkpoint_to_resume(out: str | os.PathLike, resume: str | os.PathLike | bool | None) -> str | None:
    """The checkpoint folder a run continues from: a named one, the newest in `out` (True), or none."""
    if resume is None or resume is False:
        return None
    if resume is True:
        newest = get_last_checkpoint(str(out)) if Path(out).is_dir() else None
        if newest is None:
            raise ValueError(f"nothing to resume: {out} holds no checkpoint-N folder")
        return newest
    if not Path(resume, "trainer_state.json").is_file():
        raise ValueError(f"cannot resume from {resume}: not a Trainer checkpoint folder (no trainer_state.json)")
    return str(resume)


def finish_stage(run: StageRun) -> StageRun:
    """Train (continuing from the run's checkpoint, if any) and save the model, processor and remote code."""
    run.trainer.train(resume_from_checkpoint=run.resume)
    write_checkpoint(run.out, run.trainer.model, run.processor, with_code=True)
    return run
