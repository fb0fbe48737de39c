"""Side-by-side timing of Dimple's decoding modes on a randomly initialised model (no download).

Random weights make confidences meaningless, so the operating point is fixed explicitly: no threshold, and
`steps = answer_len // tokens_per_step` so the schedule commits about `tokens_per_step` tokens per forward (the
paper's ~L/3 iterations). Forward passes are reported so numbers transfer to a trained model. CPU numbers are
for ratios only. Results are printed and appended to benchmarks/RESULTS.md.

    python benchmarks/bench_generate.py --size small --image-tokens 1024 --answer 64
"""

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch
import transformers

from dimple import DimpleConfig, DimpleModel


SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, mrope_section=[2, 3, 3], vocab_size=512),
    "small": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=[8, 12, 12], vocab_size=32000),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, mrope_section=[16, 24, 24], vocab_size=152064, rope_theta=1e6),
}
VISION = {
    "tiny": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1]),
    "small": dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, fullatt_block_indexes=[1, 3]),
    "7b": {},
}


def build(size: str, dtype: torch.dtype, device: str) -> DimpleModel:
    ids = dict(pad_token_id=0, eos_token_id=0, mask_token_id=1, image_token_id=2, video_token_id=3,
               vision_start_token_id=4, vision_end_token_id=5, vision_token_id=6)
    hidden = SIZES[size]["hidden_size"]
    config = DimpleConfig(**SIZES[size], **ids, max_position_embeddings=32768,
                          vision_config={**VISION[size], "out_hidden_size": hidden})
    torch.manual_seed(0)
    return DimpleModel(config).to(device=device, dtype=dtype).eval()


def prompt(model: DimpleModel, image_tokens: int, text_tokens: int, device: str) -> dict[str, torch.Tensor]:
    side = int(round(image_tokens**0.5))
    grid = torch.tensor([[1, 2 * side, 2 * side]], device=device)
    vision = model.config.vision_config
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(10, model.config.vocab_size, (text_tokens,), generator=generator).tolist()
    ids = text[: text_tokens // 2] + [4] + [2] * (side * side) + [5] + text[text_tokens // 2 :]
    input_ids = torch.tensor([ids], device=device)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), image_grid_thw=grid,
                pixel_values=torch.randn(4 * side * side, patch_dim, generator=generator).to(device, model.dtype))


def timed(model, inputs, runs: int, **kwargs) -> tuple[float, float, int]:
    """Median total seconds, seconds of the first forward, forward passes."""
    first, totals, passes = [], [], 0
    for _ in range(runs + 1):
        stamps = []
        handle = model.register_forward_hook(lambda *args: stamps.append(time.perf_counter()))
        start = time.perf_counter()
        out = model.generate(**inputs, return_dict_in_generate=True, **kwargs)
        if inputs["input_ids"].is_cuda:
            torch.cuda.synchronize()
        end = time.perf_counter()
        handle.remove()
        totals.append(end - start)
        first.append(stamps[0] - start)
        passes = out.num_forward_passes
    totals, first = sorted(totals[1:]), sorted(first[1:])
    return totals[len(totals) // 2], first[len(first) // 2], passes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--image-tokens", type=int, default=1024)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--answer", type=int, nargs="+", default=[64])
    parser.add_argument("--tokens-per-step", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(args.size, getattr(torch, args.dtype), device)
    inputs = prompt(model, args.image_tokens, args.text_tokens, device)
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    rows = []
    for answer in args.answer:
        settings = dict(max_new_tokens=answer, steps=max(1, answer // args.tokens_per_step), alg_p_threshold=None)
        results = {name: timed(model, inputs, args.runs, use_cache=cache, **settings)
                   for name, cache in (("no cache", False), ("prefix cache", True))}
        base = results["no cache"][0]
        for name, (total, first, passes) in results.items():
            per_step = (total - first) / max(1, passes - 1)
            rows.append(f"| {args.size} | {inputs['input_ids'].shape[1]} | {answer} | {name} | {passes} | "
                        f"{first * 1e3:.1f} | {per_step * 1e3:.1f} | {total * 1e3:.1f} | {answer / total:.1f} | "
                        f"{base / total:.2f}x |")
    header = (f"\n### {datetime.date.today()} — {machine}, torch {torch.__version__}, transformers "
              f"{transformers.__version__}, {args.dtype}, median of {args.runs} runs, "
              f"~{args.tokens_per_step} tokens/step by schedule, no threshold\n\n"
              "| size | prompt tokens | answer | mode | forwards | first step ms | per step ms | total ms | "
              "answer tok/s | speed-up vs no cache |\n|---|---|---|---|---|---|---|---|---|---|\n")
    table = header + "\n".join(rows) + "\n"
    print(table)
    with open(Path(__file__).with_name("RESULTS.md"), "a") as results_file:
        results_file.write(table)


if __name__ == "__main__":
    main()
