"""How many (masked rows x vocabulary) buffers one decoding step allocates, counted by torch's profiler on the CPU.

A step turns the logits of its K masked positions into tokens and confidences; at K = 256 and Qwen's 152,064-token
vocabulary one float32 (K, vocab) buffer is 149 MiB, so every needless copy costs as much memory as a few layers'
activations. The count is deterministic (it is the allocator's event list, not a timing): a tiny Dimple with the
real vocabulary width runs `generate(steps=1)`, i.e. exactly one step over K masked rows, under
`torch.profiler` with memory profiling, and every allocation of at least K x vocab bytes (a bool buffer of that
shape or anything larger) is counted. The decoder's own activations are far smaller at this width, so what is
counted is the LM head's output plus what the sampling path allocates.

    python benchmarks/step_allocations.py --label after            # this checkout
    PYTHONPATH=/path/to/shim/of/old/revision python benchmarks/step_allocations.py --label before

Prints one markdown row per setting (see benchmarks/step_allocations.md for recorded numbers).
"""

import argparse
import platform
from collections.abc import Callable

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

from dimple.tiny.build import build_tiny_model, build_tiny_processor

QWEN_VOCAB = 152064
SETTINGS = {
    "greedy (default)": dict(),
    "greedy, bfloat16 logits": dict(dtype=torch.bfloat16),
    "temperature 0.7 + top_p 0.9": dict(do_sample=True, temperature=0.7, top_p=0.9),
    "temperature 0.7 + top_k 50": dict(do_sample=True, temperature=0.7, top_k=50),
    "dream, temperature 0.7 + top_p 0.9": dict(do_sample=True, temperature=0.7, top_p=0.9, decoding_pipeline="dream"),
}


def allocations(run: Callable[[], object], min_bytes: int) -> tuple[int, int, int]:
    """(count, total bytes) of the allocations of at least `min_bytes` made by `run`, and the peak of all bytes
    it held at once, from the profiler's allocation timeline."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        run()
    count = total = live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action.name == "CREATE":
            live += size
            peak = max(peak, live)
            if size >= min_bytes:
                count, total = count + 1, total + size
        elif action.name == "DESTROY":
            live -= size
    return count, total, peak


def step_allocations(rows: int, vocab: int, settings: dict) -> tuple[int, int, int]:
    """Allocations of one `generate` step over `rows` masked positions with a `vocab`-wide LM head."""
    settings = dict(settings)
    dtype = settings.pop("dtype", torch.float32)
    processor = build_tiny_processor()
    model = build_tiny_model(processor, vocab_size=vocab).to(dtype)
    text = processor.apply_chat_template([{"role": "user", "content": "Describe the weather."}], add_generation_prompt=True)
    inputs = processor(text=[text], return_tensors="pt")
    torch.manual_seed(0)
    return allocations(
        lambda: model.generate(**inputs, max_new_tokens=rows, steps=1, alg="maskgit_plus", **settings),
        min_bytes=rows * vocab,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="revision label for the table (e.g. before / after)")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=QWEN_VOCAB)
    args = parser.parse_args()
    float_buffer = args.rows * args.vocab * 4
    print(f"{platform.machine()} CPU, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{args.rows} masked rows x {args.vocab} vocab (one float32 buffer = {float_buffer / 2**20:.0f} MiB)\n")
    print("| revision | setting | buffers >= rows x vocab bytes | their MiB | in float32 buffers | peak MiB |")
    print("|---|---|---|---|---|---|")
    for name, settings in SETTINGS.items():
        count, total, peak = step_allocations(args.rows, args.vocab, settings)
        print(f"| {args.label} | {name} | {count} | {total / 2**20:.0f} | {total / float_buffer:.1f} | "
              f"{peak / 2**20:.0f} |", flush=True)


if __name__ == "__main__":
    main()
