"""Accuracy and forward passes of the tiny trained Dimple on held-out synthetic examples.

For each decoding setting: exact-match accuracy of the answers (cut at the first `<|endoftext|>`), forward passes
per answer slot (the canvas has `ANSWER_SLOTS` slots; one-token-per-step decoding needs one pass per slot) and per
answer token (the tokens before `<|endoftext|>`), with and without the prefix cache. Examples are decoded one at
a time so each example's pass count is its own. Results are printed and appended to benchmarks/RESULTS.md.

    python benchmarks/eval_tiny.py --examples 200
"""

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

from dimple import DimpleModel, DimpleProcessor
from dimple.tiny.bundled import BUNDLED_CHECKPOINT
from dimple.tiny.train import ANSWER_SLOTS, example

from bench_generate import append_to_results

SETTINGS: dict[str, dict] = {
    "one token per step": dict(alg_p_threshold=None),
    "confident, threshold 0.9": dict(alg_p_threshold=0.9),
    "confident, threshold 0.95": dict(alg_p_threshold=0.95),
}


def answer_one(model: DimpleModel, processor: DimpleProcessor, sample: dict, **settings) -> tuple[str, int, int]:
    """(decoded answer, forward passes, answer tokens before the first `<|endoftext|>`) for one example."""
    inputs = processor.apply_chat_template(
        sample["messages"][:1], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    out = model.generate(
        **inputs, max_new_tokens=ANSWER_SLOTS, steps=ANSWER_SLOTS, return_dict_in_generate=True, **settings
    )
    answer_ids = out.sequences[:, inputs["input_ids"].shape[1] :]
    text = processor.post_process_image_text_to_text(answer_ids)[0].strip()
    stop = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    row = answer_ids[0].tolist()
    length = row.index(stop) if stop in row else len(row)
    return text, out.num_forward_passes, length


def evaluate(model: DimpleModel, processor: DimpleProcessor, examples: int, **settings) -> dict[str, float]:
    """Exact-match accuracy and mean forward passes over the first `examples` held-out (test split) examples."""
    correct = passes = tokens = 0
    start = time.perf_counter()
    for index in range(examples):
        sample = example(index, "test")
        text, forwards, length = answer_one(model, processor, sample, **settings)
        correct += text == sample["answer"]
        passes += forwards
        tokens += length
    return {
        "accuracy": correct / examples,
        "forwards": passes / examples,
        "forwards_per_slot": passes / (examples * ANSWER_SLOTS),
        "forwards_per_token": passes / max(tokens, 1),
        "ms_per_answer": (time.perf_counter() - start) * 1e3 / examples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(BUNDLED_CHECKPOINT))
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    model = DimpleModel.from_pretrained(args.model, dtype=torch.float32).eval()
    processor = DimpleProcessor.from_pretrained(args.model)
    rows = []
    for name, settings in SETTINGS.items():
        for cache in (True, False):
            r = evaluate(model, processor, args.examples, use_cache=cache, **settings)
            rows.append(
                f"| {name} | {'on' if cache else 'off'} | {r['accuracy'] * 100:.1f}% | {r['forwards']:.2f} | "
                f"{r['forwards_per_slot']:.3f} | {r['forwards_per_token']:.3f} | {r['ms_per_answer']:.1f} |"
            )
    machine = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    model_folder = Path(args.model).parent.name + "/" + Path(args.model).name  # e.g. tiny/checkpoint
    table = (
        f"\n### {datetime.date.today()} — tiny trained Dimple (`{model_folder}`), {machine}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, float32\n\n"
        f"{args.examples} held-out synthetic examples (`dimple.tiny.train`, test split), batch size 1, canvas of "
        f"{ANSWER_SLOTS} slots, `steps={ANSWER_SLOTS}`, greedy (temperature 0), `alg=\"maskgit_plus\"`, "
        "`dim` pipeline. Exact match after cutting at the first `<|endoftext|>`. Answer tokens = tokens before "
        "that `<|endoftext|>`. Times are CPU wall-clock, for ratios only.\n\n"
        "| decoding | prefix cache | exact match | forwards per answer | forwards per slot | "
        "forwards per answer token | ms per answer |\n|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
    )
    sys.stdout.write(table)
    if not args.no_write:
        append_to_results(Path(__file__).with_name("RESULTS.md"), table)


if __name__ == "__main__":
    main()
