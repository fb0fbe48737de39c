"""Side-by-side timing of Dimple's decoding modes and an autoregressive peer on random weights (no download).

Random weights make confidences meaningless, so the operating point is fixed explicitly: no threshold, and
`steps = answer_len // tokens_per_step` so the schedule commits about `tokens_per_step` tokens per forward (the
paper's ~L/3 iterations; in block mode the steps are shared evenly among blocks). Forward passes are reported so
numbers transfer to a trained model. The autoregressive peer is transformers' own Qwen2.5-VL with the same decoder
and vision dimensions, decoding the same number of tokens greedily with its KV cache. CPU numbers are for ratios
only. Results are printed and appended to benchmarks/RESULTS.md.

    python benchmarks/bench_generate.py --size small --answer 64 256 512
    python benchmarks/bench_generate.py --size 7b --dtype bfloat16 --answer 64 256 --compile \
        --attn sdpa flash_attention_2   # on a GPU
"""

import argparse
import datetime
import itertools
import platform
import statistics
from pathlib import Path
from typing import Callable

import torch
import transformers
from torch.utils.benchmark import Timer
from torch.utils.benchmark import timer as synchronized_clock
from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from dimple import DimpleConfig, DimpleModel
from dimple.atomic_write import write_atomically
from dimple.cache_dimple import DimpleDiffusionCache
from dimple.tiny.build import DECODER_DIMENSIONS, VISION_DIMENSIONS

SIZES = {
    "tiny": DECODER_DIMENSIONS,
    "small": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=2, mrope_section=[8, 12, 12], vocab_size=32000),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, mrope_section=[16, 24, 24], vocab_size=152064, rope_theta=1e6),
}
VISION = {
    "tiny": VISION_DIMENSIONS,
    "small": dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, fullatt_block_indexes=[1, 3]),
    "7b": {},
}
TOKEN_IDS = dict(image_token_id=2, video_token_id=3, vision_start_token_id=4, vision_end_token_id=5)


def build(size: str, dtype: torch.dtype, device: str) -> DimpleModel:
    """Random Dimple of `size` (`tiny` is the tiny family's model; the vision tower's output feeds the projector,
    as wide as the decoder unless the size says otherwise)."""
    config = DimpleConfig(**SIZES[size], **TOKEN_IDS, pad_token_id=0, eos_token_id=0, mask_token_id=1,
                          vision_token_id=6, max_position_embeddings=32768,
                          vision_config={"out_hidden_size": SIZES[size]["hidden_size"], **VISION[size]})
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs, in its dtype: a 7B fp32 copy on the host would cost minutes
        return AutoModelForImageTextToText.from_config(config, dtype=dtype).eval()


def build_autoregressive_peer(size: str, dtype: torch.dtype, device: str) -> Qwen2_5_VLForConditionalGeneration:
    """transformers' Qwen2.5-VL with Dimple's decoder and vision dimensions: the causal model Dimple started from."""
    text = {key: value for key, value in SIZES[size].items() if key not in ("mrope_section", "rope_theta")}
    rope = {"rope_type": "default", "mrope_section": SIZES[size]["mrope_section"],
            "rope_theta": SIZES[size].get("rope_theta", 10000.0)}
    config = Qwen2_5_VLConfig(
        text_config=dict(**text, max_position_embeddings=32768, rope_parameters=rope, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0),
        vision_config={**VISION[size], "out_hidden_size": SIZES[size]["hidden_size"]},
        **TOKEN_IDS,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForImageTextToText.from_config(config, dtype=dtype).eval()


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


class StepClock:
    """A streamer that notes when each step's tokens arrive and how many masks each step leaves (no hooks: they
    would force recompiles)."""

    def __init__(self, diffusion: bool, mask_token_id: int = -1):
        self.diffusion = diffusion
        self.mask_token_id = mask_token_id
        self.stamps: list[float] = []
        self.masks_left: list[int] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.diffusion and self.prompt_seen:
            self.stamps.append(synchronized_clock())
        self.prompt_seen = True

    def put_draft(self, canvas: torch.Tensor) -> None:
        self.stamps.append(synchronized_clock())
        self.masks_left.append(int((canvas == self.mask_token_id).sum()))

    def end(self) -> None:
        pass


def timed(run: Callable[[StepClock], object], diffusion: bool, repeats: int, mask_token_id: int = -1) -> dict:
    """Median over `repeats` calls: total and first-step seconds, forward passes, peak GPU memory, the masked
    rows the LM head sees per step after the first (masks left by each step but the last), and the median gap
    between consecutive steps (`median_step`: the typical later step, which a block's occasional refresh pass does
    not move, unlike the mean).

    One call is one measurement: the step stamps come from inside it, so `Timer`, which times blocks of calls after
    warm-up calls of its own, cannot take them. The clock is `torch.utils.benchmark.timer`, Timer's own, which
    synchronises the accelerator before each reading."""
    results = []
    for _ in range(repeats):
        clock = StepClock(diffusion, mask_token_id)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = synchronized_clock()
        run(clock)
        end = synchronized_clock()
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        later_rows = clock.masks_left[:-1]
        gaps = [later - earlier for earlier, later in itertools.pairwise(clock.stamps)]
        results.append(dict(total=end - start, first=clock.stamps[0] - start, forwards=len(clock.stamps), peak=peak,
                            rows=sum(later_rows) / max(1, len(later_rows)),
                            median_step=statistics.median(gaps) if gaps else clock.stamps[0] - start))
    results.sort(key=lambda result: result["total"])
    return results[len(results) // 2]


def forward_flops(config: DimpleConfig, queries: int, keys: int, head_rows: float) -> float:
    """Floating-point operations of one decoder forward: linear layers per query, attention per query-key pair, and
    the LM head on `head_rows` rows."""
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = hidden // heads
    linear = 2 * hidden * head_dim * (2 * heads + 2 * kv_heads) + 6 * hidden * config.intermediate_size
    attention = 4 * heads * head_dim * queries * keys
    return config.num_hidden_layers * (queries * linear + attention) + 2 * hidden * config.vocab_size * head_rows


def cache_ceiling(config: DimpleConfig, prompt_len: int, answer: int, masked_rows: float) -> float:
    """The most the prefix cache can make a step cheaper on a compute-bound machine: the FLOP ratio of a no-cache
    step to a cached one (window = last prompt token + answer). The decoder alone reaches the token bound
    (P+L)/(L+1), since every term is linear in the queries; the whole step does not, because both modes run the LM
    head on the same `masked_rows`."""
    total = prompt_len + answer
    return forward_flops(config, total, total, masked_rows) / forward_flops(config, answer + 1, total, masked_rows)


def median_seconds(work: Callable[[], object], min_run_time: float = 0.2) -> float:
    """Median seconds of one `work()` by `torch.utils.benchmark.Timer.blocked_autorange`: warm-up runs first, blocks
    of calls long enough that the clock's cost (an accelerator synchronisation) vanishes, at torch's current thread
    count (Timer's own default is one thread)."""
    timer = Timer(stmt="work()", globals={"work": work}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def decoder_step_costs(model: DimpleModel, inputs: dict[str, torch.Tensor], answer: int) -> str:
    """Median decoder forward (no LM head, no sampler) over the whole sequence vs over the cached window.

    The prefix cache can at most make a step (P + L) / (L + 1) times cheaper; this isolates how close the decoder
    gets, since the LM head on masked rows and the sampler cost the same with or without the cache.
    """
    prompt_len = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], inputs["input_ids"].new_full((1, answer), model.config.mask_token_id)], 1)
    positions, _ = model._rope_positions(ids, inputs["image_grid_thw"], None)
    embeds = model.get_input_embeddings()(ids)

    with torch.no_grad():
        # At least a second each: a full-sequence forward can take a good part of one on a CPU.
        full = median_seconds(lambda: model.model(inputs_embeds=embeds, position_ids=positions), min_run_time=1.0)
        cache = DimpleDiffusionCache(model.config.num_hidden_layers)
        model.model(inputs_embeds=embeds, position_ids=positions, cache=cache)
        cache.set_window(prompt_len - 1)
        window = median_seconds(lambda: model.model(inputs_embeds=embeds[:, prompt_len - 1 :],
                                                    position_ids=positions[..., prompt_len - 1 :], cache=cache),
                                min_run_time=1.0)
    bound = (prompt_len + answer) / (answer + 1)
    return (f"Decoder forward alone, {answer}-token answer: full sequence {full * 1e3:.1f} ms, cached window "
            f"{window * 1e3:.1f} ms, {full / window:.1f}x (token bound (P+L)/(L+1) = {bound:.1f}x, "
            f"{full / window / bound:.2f} of it).")


def per_step(result: dict[str, float]) -> float:
    """Mean seconds per step after the first, which is a full pass in every mode."""
    return (result["total"] - result["first"]) / max(1, result["forwards"] - 1)


def attention_tag(attn: str, all_attn: list[str]) -> str:
    """Mode-name suffix naming the attention implementation, when more than one is timed."""
    return f" [{attn}]" if len(all_attn) > 1 else ""


def whole_step_note(config: DimpleConfig, prompt_len: int, answer: int, results: dict, tag: str = "") -> str:
    """Per-step gain of the prefix cache (first step excluded: it is a full forward in both modes) next to what bounds
    it: the token bound and the FLOP ceiling at the masked rows the LM head saw in that run."""
    cached = results["prefix cache" + tag]
    gain = per_step(results["no cache" + tag]) / per_step(cached)
    bound = (prompt_len + answer) / (answer + 1)
    ceiling = cache_ceiling(config, prompt_len, answer, cached["rows"])
    return (f"- Whole step, {answer}-token answer: prefix cache {gain:.1f}x cheaper than no cache (token bound "
            f"{bound:.1f}x, {gain / bound:.2f} of it; FLOP ceiling {ceiling:.1f}x at {cached['rows']:.1f} masked rows "
            f"on average, {gain / ceiling:.2f} of it).")


def dimple_modes(answer: int, block: int, with_compile: bool) -> dict[str, dict]:
    modes = {"no cache": dict(use_cache=False), "prefix cache": dict(use_cache=True),
             f"dual cache, block {block}": dict(use_cache=True, block_length=block)}
    if with_compile:
        modes["prefix cache + compile"] = dict(use_cache=True, compile_forward=True)
        modes[f"dual cache, block {block} + compile"] = dict(use_cache=True, block_length=block, compile_forward=True)
    return modes


def time_dimple(model: DimpleModel, inputs: dict[str, torch.Tensor], settings: dict, runs: int) -> dict:
    """`timed` Dimple decoding with `settings`, after a warm-up: the full settings when compiling (so the timed calls
    replay what the warm-up compiled, and `warm_up` is the compile time), else a short call that only loads kernels."""
    compiling = bool(settings.get("compile_forward"))
    warm_up = settings if compiling else {**settings, "max_new_tokens": min(8, settings["max_new_tokens"]), "steps": 2}
    start = synchronized_clock()
    model.generate(**inputs, **warm_up)
    warm_up_seconds = synchronized_clock() - start
    result = timed(lambda clock: model.generate(**inputs, streamer=clock, **settings), True, runs,
                   model.config.mask_token_id)
    return {**result, "warm_up": warm_up_seconds}


def time_peer(peer: Qwen2_5_VLForConditionalGeneration, inputs: dict[str, torch.Tensor], answer: int,
              runs: int) -> dict:
    """`timed` greedy decoding of exactly `answer` tokens by the autoregressive peer (with its KV cache), after a
    short warm-up."""
    settings = dict(max_new_tokens=answer, min_new_tokens=answer, do_sample=False, pad_token_id=0)
    peer.generate(**inputs, **{**settings, "max_new_tokens": 8, "min_new_tokens": 8})
    return timed(lambda clock: peer.generate(**inputs, streamer=clock, **settings), False, runs)


def append_to_results(path: Path, text: str) -> None:
    """Append `text` to a results file by replacing it whole (temporary file + `os.replace`), so a run killed while
    writing leaves the earlier tables intact."""
    before = path.read_text(encoding="utf-8") if path.exists() else ""
    write_atomically(path, before + text)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--image-tokens", type=int, default=1024)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--answer", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--tokens-per-step", type=int, default=3)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compile", action="store_true", help="add torch.compile modes (meant for a GPU)")
    parser.add_argument("--no-peer", action="store_true", help="skip the autoregressive peer")
    parser.add_argument("--decoder-only", action="store_true", help="only the decoder forward: full vs cached window")
    parser.add_argument("--attn", nargs="+", default=["sdpa"],
                        help="attention implementations timed side by side, e.g. sdpa flash_attention_2 (GPU)")
    return parser.parse_args()


def machine_name(device: str) -> str:
    """The GPU's name, or the CPU and the thread count torch uses: what a reader needs to compare runs."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main() -> None:
    args = arguments()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    model = build(args.size, dtype, device)
    peer = None if args.no_peer or args.decoder_only else build_autoregressive_peer(args.size, dtype, device)
    inputs = prompt(model, args.image_tokens, args.text_tokens, device)
    machine = machine_name(device)
    rows, step_notes = [], []
    for answer in [] if args.decoder_only else args.answer:
        steps = max(1, answer // args.tokens_per_step)
        results = {}
        for attn in args.attn:
            model.set_attn_implementation(attn)
            for name, mode in dimple_modes(answer, args.block, args.compile).items():
                settings = dict(max_new_tokens=answer, steps=steps, alg_p_threshold=None, **mode)
                results[name + attention_tag(attn, args.attn)] = time_dimple(model, inputs, settings, args.runs)
        model.set_attn_implementation(args.attn[0])
        if peer is not None:
            results["AR peer (Qwen2.5-VL, KV cache)"] = time_peer(peer, inputs, answer, args.runs)
        first = attention_tag(args.attn[0], args.attn)
        base = results["no cache" + first]["total"]
        step_notes.append(whole_step_note(model.config, inputs["input_ids"].shape[1], answer, results, first))
        peer_total = results.get("AR peer (Qwen2.5-VL, KV cache)", {}).get("total")
        for name, result in results.items():
            peak = f"{result['peak']:.2f}" if result["peak"] is not None else "—"
            versus_peer = f"{peer_total / result['total']:.2f}x" if peer_total else "—"
            rows.append(f"| {args.size} | {inputs['input_ids'].shape[1]} | {answer} | {name} | {result['forwards']} | "
                        f"{result['first'] * 1e3:.1f} | {per_step(result) * 1e3:.1f} | {result['total'] * 1e3:.1f} | "
                        f"{answer / result['total']:.1f} | {peak} | {base / result['total']:.2f}x | {versus_peer} |")
    text = model.config
    size = (f"`{args.size}` = {sum(p.numel() for p in model.parameters()) / 1e6:.3g}M parameters "
            f"({text.num_hidden_layers} layers of width {text.hidden_size}, vocabulary {text.vocab_size})")
    header = (f"\n### {datetime.date.today()} — {machine}, torch {torch.__version__}, transformers "
              f"{transformers.__version__}, {args.dtype}, {size}, attention {', '.join(args.attn)}, "
              f"median of {args.runs} run(s), "
              f"~{args.tokens_per_step} tokens/step by schedule, no threshold, block {args.block}\n\n"
              "| size | prompt tokens | answer | mode | forwards | first step ms | per step ms | total ms | "
              "answer tok/s | peak GiB | speed-up vs no cache | speed vs AR peer |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    notes = "\n".join(step_notes + [f"- {decoder_step_costs(model, inputs, answer)}" for answer in args.answer])
    if args.decoder_only:
        header = (f"\n### {datetime.date.today()} — {machine}, torch {torch.__version__}, transformers "
                  f"{transformers.__version__}, {args.dtype}, {size}, prompt {inputs['input_ids'].shape[1]} "
                  "tokens, decoder forward only, median of torch.utils.benchmark's blocked_autorange\n")
    table = header + "\n".join(rows) + "\n\n" + notes + "\n"
    print(table)
    append_to_results(Path(__file__).with_name("RESULTS.md"), table)


if __name__ == "__main__":
    main()
