"""Document functions of the `dimple_shapes` lmms-eval task: image from the task folder, question, exact match."""

from pathlib import Path

from PIL import Image

TASK_FOLDER = Path(__file__).resolve().parent


def doc_to_visual(doc: dict) -> list[Image.Image]:
    with Image.open(TASK_FOLDER / doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"exact_match": float(results[0].strip().lower() == doc["answer"].lower())}
