"""Concurrent requests: the batching engine against one-by-one decoding, the same requests in the same run.

N clients each send one request at the same moment (held-out pictures and questions of the bundled model's shapes
task). One by one: `generate()` answers them in turn, as a server without batching would, so request i waits for
the i - 1 before it. Engine: every request is submitted to a `DiffusionEngine` at once and decoded together, one
forward pass per step. Per cell: wall time until the last answer, requests/s, answer tokens/s (answer slots), p50
and p95 latency (submission to answer), speed-up of the engine's wall time over one by one, and how many engine
answers equal their solo `generate()` answers. Each cell is the median of `--repeats` runs. With `--server`, the
same burst also goes through `dimple serve` on 127.0.0.1 (concurrent HTTP clients vs one at a time).
Results are printed and appended to benchmarks/RESULTS.md (or `--out`).

    python benchmarks/bench_engine.py                      # in-process, bundled tiny checkpoint, CPU
    python benchmarks/bench_engine.py --clients 1 4 8 16 --server
"""

import argparse
import datetime
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from dimple import DimpleModel, DimpleProcessor
from dimple.atomic_write import write_atomically
from dimple.engine import DiffusionEngine
from dimple.tiny.bundled import BUNDLED_CHECKPOINT
from dimple.tiny.train import example

COLUMNS = ("clients", "mode", "wall s", "requests/s", "answer tok/s", "p50 latency ms", "p95 latency ms",
           "speed-up", "answers equal solo")


def client_chats(count: int) -> list[list[dict]]:
    """`count` held-out shapes-task chats (picture + question)."""
    return [example(index, split="test")["messages"][:1] for index in range(count)]


def client_requests(processor: DimpleProcessor, count: int) -> list[dict[str, torch.Tensor]]:
    """The chats of `client_chats`, one processor output each (what one client sends)."""
    return [processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt") for chat in client_chats(count)]


def padded_requests(processor: DimpleProcessor, count: int) -> dict[str, torch.Tensor]:
    """The first `count` chats as one left-padded batch."""
    return processor.apply_chat_template(client_chats(count), add_generation_prompt=True, tokenize=True,
                                         return_dict=True, return_tensors="pt", processor_kwargs={"padding": True})


def on_device(inputs: dict, device: torch.device) -> dict:
    return {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile: the smallest value at or above `share` of them."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def padded_batch(model: Any, batch: dict, settings: dict) -> dict:
    """One static generate() call over the whole burst, left-padded: every request waits for the slowest, and none
    can join later; the ceiling a scheduler that batches whole bursts reaches."""
    start = time.perf_counter()
    out = model.generate(**on_device(batch, model.device), **settings).cpu()
    wall = time.perf_counter() - start
    answers = list(out[:, batch["input_ids"].shape[1] :])
    return dict(wall=wall, latencies=[wall] * len(answers), answers=answers)


def one_by_one(model: Any, requests: list[dict], settings: dict) -> dict:
    """generate() per request, in turn: latency counts the wait for the requests before it."""
    start, latencies, answers = time.perf_counter(), [], []
    for inputs in requests:
        inputs = on_device(inputs, model.device)
        answers.append(model.generate(**inputs, **settings)[0, inputs["input_ids"].shape[1] :].cpu())
        latencies.append(time.perf_counter() - start)
    return dict(wall=time.perf_counter() - start, latencies=latencies, answers=answers)


def together(engine: DiffusionEngine, requests: list[dict], settings: dict) -> dict:
    """Every request submitted to the engine at once; latency is submission to answer."""
    finished: dict[int, float] = {}
    start = time.perf_counter()
    handles = [engine.submit(on_device(inputs, engine.model.device), **settings) for inputs in requests]
    for index, handle in enumerate(handles):
        handle.future.add_done_callback(lambda _, index=index: finished.__setitem__(index, time.perf_counter()))
    answers = [handle.result().cpu() for handle in handles]
    wall = max(finished.values()) - start
    return dict(wall=wall, latencies=[finished[index] - start for index in range(len(handles))], answers=answers)


def summarize(clients: int, mode: str, runs: list[dict], answer_slots: int, solo: list[torch.Tensor],
              baseline: float | None) -> dict:
    """The median run (by wall time) of a cell, as a table row."""
    run = sorted(runs, key=lambda run: run["wall"])[len(runs) // 2]
    equal = sum(torch.equal(answer, alone) for answer, alone in zip(run["answers"], solo))
    return dict(clients=clients, mode=mode, wall=run["wall"], requests_s=clients / run["wall"],
                tokens_s=clients * answer_slots / run["wall"], p50_ms=percentile(run["latencies"], 0.5) * 1e3,
                p95_ms=percentile(run["latencies"], 0.95) * 1e3,
                speedup=None if baseline is None else baseline / run["wall"], equal=equal)


def measure(model: Any, requests: list[dict], clients: list[int], settings: dict, max_batch_size: int,
            repeats: int, padded: Any = None) -> list[dict]:
    """For each client count: one by one, then the engine (max_batch_size = the count, at most `max_batch_size`),
    each `repeats` times (the first untimed engine call builds nothing, but warms the allocator); with `padded`
    (count -> a left-padded batch of the same requests), also one static padded generate() call."""
    answer_slots = settings["max_new_tokens"]
    rows = []
    for count in clients:
        burst = [requests[index % len(requests)] for index in range(count)]
        sequential, batched = [], []
        with DiffusionEngine(model, max_batch_size=min(count, max_batch_size)) as engine:
            together(engine, burst[:1], settings)
            for _ in range(repeats):  # interleaved, so a slow spell of a shared machine hits both modes alike
                sequential.append(one_by_one(model, burst, settings))
                batched.append(together(engine, burst, settings))
        solo = sequential[0]["answers"]
        base = summarize(count, "one by one (generate)", sequential, answer_slots, solo, None)
        rows += [base, summarize(count, f"engine, max batch {min(count, max_batch_size)}", batched, answer_slots,
                                 solo, base["wall"])]
        if padded is not None and count > 1:
            static = [padded_batch(model, padded(count), settings) for _ in range(repeats)]
            rows.append(summarize(count, "one padded batch (generate), reference", static, answer_slots, solo,
                                  base["wall"]))
    return rows


def forward_costs(model: Any, requests: list[dict], counts: list[int], answer_slots: int, repeats: int) -> list[str]:
    """The floor under batching: one forward pass over `count` rows of a request's full sequence (prompt + answer
    slots, as its first pass feeds it), per row. Where the time per row does not fall as rows are added, the
    passes are bound by arithmetic, and batching can only save the work around them (Python, small kernels)."""
    length = requests[0]["input_ids"].shape[1] + answer_slots
    lines = [f"| rows | forward ms (median of {max(repeats, 5)}) | ms per row |", "|---|---|---|"]
    for count in sorted(set(counts)):
        embeds = torch.randn(count, length, model.config.hidden_size, dtype=model.dtype, device=model.device)
        times = []
        with torch.no_grad():
            model(inputs_embeds=embeds, logits_to_keep=answer_slots)
            for _ in range(max(repeats, 5)):
                start = time.perf_counter()
                model(inputs_embeds=embeds, logits_to_keep=answer_slots)
                times.append(time.perf_counter() - start)
        median = statistics.median(times) * 1e3
        lines.append(f"| {count} | {median:.1f} | {median / count:.2f} |")
    return lines


def render_rows(rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        speedup = "—" if row["speedup"] is None else f"{row['speedup']:.2f}x"
        lines.append(f"| {row['clients']} | {row['mode']} | {row['wall']:.3f} | {row['requests_s']:.1f} | "
                     f"{row['tokens_s']:.0f} | {row['p50_ms']:.0f} | {row['p95_ms']:.0f} | {speedup} | "
                     f"{row['equal']}/{row['clients']} |")
    return lines


def machine() -> str:
    return (f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} thread(s), torch "
            f"{torch.__version__}, transformers {transformers.__version__}")


def schedule(steps: int | None) -> str:
    if steps is None:
        return "confident decoding (threshold 0.95)"
    return f"a fixed schedule of {steps} forward passes per answer (threshold off)"


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=12, help="answer slots (the bundled default: 12)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None,
                        help="a fixed schedule of this many forward passes per answer (threshold off); default: "
                             "confident decoding, which answers most of these requests in one or two passes")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, in-process and in both servers (1: steady on a shared machine)")
    parser.add_argument("--server", action="store_true", help="also through `dimple serve` on 127.0.0.1")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    model = DimpleModel.from_pretrained(BUNDLED_CHECKPOINT).eval()
    processor = DimpleProcessor.from_pretrained(BUNDLED_CHECKPOINT)
    requests = client_requests(processor, max(args.clients))
    settings = dict(max_new_tokens=args.max_new_tokens)
    if args.steps is not None:
        settings.update(steps=args.steps, alg_p_threshold=None)
    rows = measure(model, requests, args.clients, settings, args.max_batch_size, args.repeats,
                   padded=lambda count: padded_requests(processor, count))
    sections = [f"In-process: N clients each send one of N held-out shapes-task chats (picture + question) at once. "
                "Reference row: the same N as one static padded generate() call (no request can join or leave "
                "it; latency = its wall time).", ""]
    sections += render_rows(rows)
    prompt_len = requests[0]["input_ids"].shape[1]
    sections += ["", f"The floor under batching: one forward pass over N rows of one request's whole sequence "
                 f"({prompt_len} prompt + {args.max_new_tokens} answer positions, what its first pass feeds)", ""]
    sections += forward_costs(model, requests, args.clients, args.max_new_tokens, args.repeats)
    if args.server:
        from bench_engine_server import measure_server

        sections += ["", "Through `dimple serve` (127.0.0.1, OpenAI chat completions, concurrent HTTP clients vs one "
                     "request at a time)", ""]
        sections += render_rows(measure_server(BUNDLED_CHECKPOINT, processor, args.clients, settings, args.repeats,
                                               args.threads))
    date = datetime.date.today().isoformat()
    text = (f"\n### {date} — batching engine vs one by one: {machine()}; bundled tiny checkpoint, float32, "
            f"{args.max_new_tokens} answer slots, {schedule(args.steps)}, defaults otherwise (greedy, prefix cache); "
            f"median of {args.repeats} run(s) per cell\n\n" + "\n".join(sections) + "\n")
    print(text)
    before = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
    write_atomically(args.out, before + text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
