"""One prepared GPU run: every CUDA claim of this repository (parity, speed), checked and timed by one command.

A GPU is lent to this project only now and then, for minutes, with no internet, so an unprepared run wastes it.
This script is that run, ready in advance: sections in order of value, a time budget (`--budget-s`, default 450 s
for the sections, so the whole command with its imports fits in 8 minutes) checked between measurements, and a
report rewritten after every section (temporary file + `os.replace`), so a run stopped by its budget, or killed,
still leaves a valid partial report.

1. env: GPU, driver, torch, transformers, the attention packages found.
2. cuda_tests: tests/test_cuda.py in a subprocess (counts and failures).
3. fixtures: the reference fixtures' forward parity and generation runs on the device, float32 (token-exact
   expected) and bfloat16 (agreement reported), for every attention backend that loads.
4. floor: device memory bandwidth (a large copy, bytes read + written) and the matrix-multiply rate, and from them
   the least time a decoder step can take: streaming the decoder and LM-head weights once (7B: ~14 GB).
5. steps: the released 7B dimensions, bfloat16, random weights built on the device (nothing to download):
   per-step latency of full and cached window steps against that floor; no cache, prefix cache and dual cache;
   answers 64/256/512; eager vs torch.compile vs compiled CUDA graphs (reduce-overhead); each attention backend.
6. tps: answer tokens per second against transformers' Qwen2.5-VL of the same size with its KV cache, at 1, 2 and
   3 tokens per step, batch 1 and 8.
7. engine: concurrent clients (1, 8, 32) at 7B: the same requests one by one with generate() and submitted at once
   to the batching engine (`dimple.engine`), as benchmarks/bench_engine.py measures the tiny model on a CPU.
Then the goals are read off the numbers: cached step <= 1.3x the floor, batch-1 tokens/s >= 2x the peer at 3
tokens per step, flash attention >= sdpa, the engine >= 2x one by one at the most clients.

`--dry-run` runs every path of this script on tiny sizes on the CPU (tests/test_gpu_run.py does, so the script cannot
rot between loans); it writes into `--out` or, without it, a new temporary folder, never into the tracked
benchmarks/. README "One prepared GPU run" gives the command and the install path on the lent machine.

    python benchmarks/gpu_run.py --out "$OUT"        # GPU: appends to $OUT/RESULTS.md, writes $OUT/gpu_run-<time>.json
    python benchmarks/gpu_run.py --dry-run --out /tmp/rehearsal
"""

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import CompileConfig

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "tests")]

import bench_generate as bench
from reference_fixtures import ReferenceSet, all_sets, forward_cases, generation_runs, run_kwargs

import dimple
from dimple import DimpleModel
from dimple.atomic_write import write_atomically


FLEX = {"": "flex_attention", "vision_config": "sdpa"}  # the Qwen2.5-VL vision tower has no flex path
ATTENTION_DISTRIBUTIONS = ("flash-attn", "flash_attn_3", "flash-attn-4", "quack-kernels", "nvidia-cutlass-dsl",
                           "kernels", "triton")
CACHE_MODES = ("none", "prefix", "dual")


class OutOfTime(Exception):
    """Raised between measurements when the time left cannot pay for the next one."""


@dataclass
class Budget:
    """Seconds a run (or one section of it) may use, counted from `started` on the monotonic clock."""

    seconds: float
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.started)

    def require(self, seconds: float, what: str) -> None:
        """Stop before `what` unless `seconds` are left, so no measurement is cut off half-way."""
        if self.left() < seconds:
            raise OutOfTime(f"{self.left():.0f} s left, {what} needs about {seconds:.0f} s")


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: the GPU plan times the released 7B's dimensions; the dry run's executes the same code in
    seconds."""

    device: str
    size: str  # a key of bench_generate.SIZES
    dtype: torch.dtype  # of the timed models
    image_tokens: int
    text_tokens: int
    answers: tuple[int, ...]  # answer lengths of the step grid
    block: int  # dual-cache block length
    tps_answer: int  # answer length of the tokens-per-second comparison and of the compiled steps
    tokens_per_step: tuple[int, ...]  # forced by the schedule: steps = answer // k, no threshold
    batch_sizes: tuple[int, ...]
    fixture_backends: tuple[str, ...]  # attention backends checked on the reference fixtures
    fixture_runs: int | None  # generation runs per backend and dtype (None: every recorded run)
    timing_backends: tuple[str, ...] | None  # attention backends timed at 7B (None: sdpa + flash packages found)
    compile_configs: dict[str, CompileConfig]  # label -> settings, most valuable first (tps reuses the first)
    compile_needs_s: float  # seconds a compile-and-time item is expected to take at most
    copy_bytes: int
    matmul_size: int
    runs: int  # timed calls per measurement (median)
    engine_clients: tuple[int, ...]  # concurrent clients of the engine section
    engine_answer: int  # their answer length
    section_caps: dict[str, float]  # most seconds each section may take


def gpu_plan() -> Plan:
    """The released 7B's dimensions on one H100/H200-class GPU. The caps are estimates that keep a slow section from
    starving the later ones: the CUDA tests compile four tiny models, and at 7B each compile takes a minute or more,
    so CUDA graphs come first and the default-mode compile runs only if time is left."""
    return Plan(
        device="cuda", size="7b", dtype=torch.bfloat16, image_tokens=1024, text_tokens=32, answers=(64, 256, 512),
        block=32, tps_answer=256, tokens_per_step=(3, 2, 1), batch_sizes=(1, 8),
        fixture_backends=("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention"),
        fixture_runs=None, timing_backends=None,
        compile_configs={"CUDA graphs": CompileConfig(mode="reduce-overhead"),
                         "torch.compile": CompileConfig(mode="default")},
        compile_needs_s=60, copy_bytes=2 * 2**30, matmul_size=8192, runs=1,
        engine_clients=(1, 8, 32), engine_answer=64,
        section_caps=dict(env=20, cuda_tests=120, fixtures=75, floor=20, steps=180, engine=75, tps=120),
    )


def dry_run_plan() -> Plan:
    """Tiny dimensions on the CPU in float32. Flex attention is left out (on a CPU each new shape is a C++ compile
    of minutes) and eager attention stands in for a second timed backend; compiling uses dynamo with the eager
    backend, which exercises the compiled path without inductor's C++ builds. flash_attention_2 stays in the
    fixture list so the not-installed path runs too (where it is installed, it runs)."""
    eager_dynamo = CompileConfig(backend="eager", mode=None)
    return Plan(
        device="cpu", size="tiny", dtype=torch.float32, image_tokens=16, text_tokens=8, answers=(8, 16), block=4,
        tps_answer=12, tokens_per_step=(3, 2, 1), batch_sizes=(1, 2),
        fixture_backends=("sdpa", "flash_attention_2"), fixture_runs=2, timing_backends=("sdpa", "eager"),
        compile_configs={"CUDA graphs": eager_dynamo, "torch.compile": eager_dynamo}, compile_needs_s=0,
        copy_bytes=8 * 2**20, matmul_size=128, runs=1,
        engine_clients=(1, 2), engine_answer=8,
        section_caps=dict(env=600, cuda_tests=600, fixtures=600, floor=600, steps=600, engine=600, tps=600),
    )


@dataclass
class Run:
    """What the sections share: the plan, the current section's budget, measured ceilings, and models built once."""

    plan: Plan
    budget: Budget
    physics: dict = field(default_factory=dict)
    compiled: set[tuple[str, str]] = field(default_factory=set)  # (compile label, cache) built at batch 1
    models: dict[str, torch.nn.Module] = field(default_factory=dict)

    def dimple(self) -> DimpleModel:
        if "dimple" not in self.models:
            self.models["dimple"] = bench.build(self.plan.size, self.plan.dtype, self.plan.device)
        return self.models["dimple"]

    def peer(self) -> torch.nn.Module:
        if "peer" not in self.models:
            self.models["peer"] = bench.build_autoregressive_peer(self.plan.size, self.plan.dtype, self.plan.device)
        return self.models["peer"]

    def prompt(self, batch: int) -> dict[str, torch.Tensor]:
        """The benchmark prompt (one image, text around it) repeated `batch` times: unpadded, so no mask is passed."""
        single = bench.prompt(self.dimple(), self.plan.image_tokens, self.plan.text_tokens, self.plan.device)
        return {name: value.repeat(batch, *[1] * (value.dim() - 1)) for name, value in single.items()}


def installed_flash_backends() -> list[str]:
    """flash_attention_N for each version transformers itself finds installed (no check exists for 4 before 5.23)."""
    return [f"flash_attention_{version}" for version in (2, 3, 4)
            if getattr(transformers.utils, f"is_flash_attn_{version}_available", lambda: False)()]


def distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvidia_driver() -> str | None:
    """The driver version as nvidia-smi reports it (torch knows only the CUDA runtime it was built with)."""
    if shutil.which("nvidia-smi") is None:
        return None
    answer = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=30)
    return answer.stdout.strip().splitlines()[0] if answer.returncode == 0 and answer.stdout.strip() else None


def attempt(rows: list[dict], row: dict, measure: Callable[..., dict], *args: object) -> dict:
    """Append `row` completed by `measure(*args)`, or by the error it raised: on a lent GPU one failing backend or
    compile mode must not cost the measurements after it. Running out of time still stops the section."""
    try:
        row.update(measure(*args))
    except OutOfTime:
        raise
    except Exception as error:
        row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
    rows.append(row)
    return row


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def table(columns: tuple[str, ...], rows: list[dict], head: Callable[[dict], list[str]],
          measured: Callable[[dict], list[str]]) -> list[str]:
    """Markdown lines of a table of measured rows: `head(row)` names a row, `measured(row)` fills the rest, or, for a
    row whose measurement failed, its error does, with the remaining cells left empty."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        named = head(row)
        cells = [*named, row["error"], *[""] * (len(columns) - len(named) - 1)] if "error" in row else [
            *named, *measured(row)]
        lines.append("|" + "".join(f" {cell} |" if cell else " |" for cell in cells))
    return lines


# ------------------------------------------------------------------------------------------------------------------
# 1. environment
# ------------------------------------------------------------------------------------------------------------------


def run_env(run: Run, record: dict) -> None:
    """What the numbers were measured on, and which attention packages the later sections can use."""
    record.update(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                  cuda_runtime=torch.version.cuda, cpu_threads=torch.get_num_threads(), device=run.plan.device,
                  dimple=str(Path(dimple.__file__).parent))
    if run.plan.device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        record.update(gpu=properties.name, gpu_memory_gib=properties.total_memory / 2**30,
                      multiprocessors=properties.multi_processor_count,
                      capability=f"{properties.major}.{properties.minor}", driver=nvidia_driver(),
                      sdpa_kernels=dict(flash=torch.backends.cuda.flash_sdp_enabled(),
                                        cudnn=torch.backends.cuda.cudnn_sdp_enabled(),
                                        mem_efficient=torch.backends.cuda.mem_efficient_sdp_enabled()))
    else:
        record.update(gpu=None, gpu_memory_gib=None, cpu=platform.processor() or platform.machine())
    record["attention_packages"] = {name: distribution_version(name) for name in ATTENTION_DISTRIBUTIONS}
    record["flash_backends"] = installed_flash_backends()
    record["flex_attention"] = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def render_env(record: dict) -> str:
    machine = (f"{record.get('gpu')} ({fmt(record.get('gpu_memory_gib'), 0)} GiB, {record.get('multiprocessors')} "
               f"SMs, capability {record.get('capability')}), driver {record.get('driver')}, CUDA "
               f"{record.get('cuda_runtime')}" if record.get("gpu") else
               f"{record.get('cpu')} CPU, {record.get('cpu_threads')} threads (dry run)")
    packages = ", ".join(f"{name} {version}" for name, version in record.get("attention_packages", {}).items()
                         if version) or "none"
    return (f"- Machine: {machine}; Python {record.get('python')}, torch {record.get('torch')}, transformers "
            f"{record.get('transformers')}; dimple from `{record.get('dimple')}`.\n"
            f"- Attention: flash backends transformers finds: {', '.join(record.get('flash_backends', [])) or 'none'}; "
            f"flex attention {'importable' if record.get('flex_attention') else 'missing'}; packages: {packages}"
            + (f"; SDPA kernels enabled: {record['sdpa_kernels']}" if record.get("sdpa_kernels") else "") + ".\n")


# ------------------------------------------------------------------------------------------------------------------
# 2. the CUDA tests
# ------------------------------------------------------------------------------------------------------------------

TEST_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
FAILURE_LINE = re.compile(r"^(?:FAILED|ERROR) (\S+::\S+)(?: - (.*))?$")


def run_cuda_tests(run: Run, record: dict) -> None:
    """tests/test_cuda.py in its own process (a crash or hang there cannot take this run down); counts are read
    from pytest's verbose lines, so a run cut off by the budget still reports the tests that finished."""
    command = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    timeout = max(1.0, run.budget.left())
    try:
        finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        output, record["returncode"], record["timed_out"] = finished.stdout, finished.returncode, False
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout or ""
        record["returncode"], record["timed_out"] = None, True
    outcomes = [match.group(2) for line in output.splitlines() if (match := TEST_LINE.match(line))]
    record.update(passed=outcomes.count("PASSED"), failed=outcomes.count("FAILED"), errors=outcomes.count("ERROR"),
                  skipped=outcomes.count("SKIPPED"))
    record["failures"] = [f"{match.group(1)}: {(match.group(2) or '')[:200]}" for line in output.splitlines()
                          if (match := FAILURE_LINE.match(line))]
    if record["timed_out"]:
        raise OutOfTime(f"tests/test_cuda.py still running after {timeout:.0f} s")


def render_cuda_tests(record: dict) -> str:
    counts = (f"{record.get('passed', 0)} passed, {record.get('failed', 0)} failed, {record.get('errors', 0)} errors, "
              f"{record.get('skipped', 0)} skipped")
    failures = "".join(f"  - {failure}\n" for failure in record.get("failures", []))
    return f"- `tests/test_cuda.py`: {counts} (exit code {record.get('returncode')}).\n{failures}"


# ------------------------------------------------------------------------------------------------------------------
# 3. reference fixtures on the device
# ------------------------------------------------------------------------------------------------------------------


def on_device(inputs: dict[str, torch.Tensor], device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Inputs moved to the model's device; pixel values in the model's dtype, ids unchanged."""
    return {name: value.to(device, dtype if value.is_floating_point() else value.dtype)
            for name, value in inputs.items()}


def forward_parity(model: DimpleModel, reference: ReferenceSet, device: str, dtype: torch.dtype) -> dict:
    """Logits of every recorded forward case against the reference's on real (unpadded) positions: how many are
    within the parity tests' tolerance, the largest difference, and how often the top token agrees."""
    within, largest, agreeing, positions = 0, 0.0, 0, 0
    cases = [(ref, case) for ref, case in forward_cases() if ref is reference]
    for ref, case in cases:
        inputs = ref.inputs(case)
        inputs["input_ids"] = ref.tensor(case, "forward.input_ids")
        inputs["attention_mask"] = ref.tensor(case, "forward.attention_mask")
        with torch.no_grad():
            logits = model(**on_device(inputs, device, dtype)).logits.float().cpu()
        real = inputs["attention_mask"].bool()
        expected = ref.tensor(case, "forward.logits")[real]
        difference = float((logits[real] - expected).abs().max())
        within += difference <= max(1e-4, 3 * case["forward"]["float64_model_max_abs_logit_diff"])
        largest = max(largest, difference)
        agreeing += int((logits[real].argmax(-1) == expected.argmax(-1)).sum())
        positions += int(real.sum())
    return dict(cases=len(cases), within_tolerance=within, max_abs_diff=largest, argmax_agreement=agreeing / positions)


def generation_agreement(model: DimpleModel, reference: ReferenceSet, device: str, dtype: torch.dtype,
                         limit: int | None, budget: Budget) -> dict:
    """The recorded batch-1 decoding runs: how many are token-exact (every step's canvas and the answer, as the
    parity tests demand) and the share of answer tokens equal to the reference's. Stops early, counting only
    the runs done, when the budget is spent (a backend that compiles per shape, like flex, can take minutes)."""
    runs = [(ref, case, run) for ref, case, run in generation_runs(batch_one=True) if ref is reference]
    if limit is not None:
        runs = runs[:: max(1, len(runs) // limit)][:limit]  # spread over cases and decoding settings
    exact, equal_tokens, tokens, done = 0, 0, 0, 0
    for ref, case, run in runs:
        if budget.left() <= 0:
            break
        done += 1
        inputs = ref.inputs(case)
        out = model.generate(**on_device(inputs, device, dtype), **run_kwargs(run))
        sequences, history = out.sequences.cpu(), torch.stack(out.history).cpu()
        expected = ref.tensors[run["tensors"]["sequences"]]
        exact += (len(out.history) == run["steps_executed"]
                  and torch.equal(history, ref.tensors[run["tensors"]["history"]])
                  and torch.equal(sequences, expected))
        prompt_len = inputs["input_ids"].shape[1]
        answer = expected[:, prompt_len:]
        tokens += answer.numel()
        if sequences.shape == expected.shape:
            equal_tokens += int((sequences[:, prompt_len:] == answer).sum())
    return dict(runs=done, planned_runs=len(runs), token_exact=exact,
                token_agreement=equal_tokens / max(1, tokens))


def fixture_combo(plan: Plan, budget: Budget, reference: ReferenceSet, backend: str, dtype: torch.dtype) -> dict:
    """One fixture set's forward cases and decoding runs with one attention backend in one dtype."""
    start = time.perf_counter()
    implementation = FLEX if backend == "flex_attention" else backend
    model = DimpleModel.from_pretrained(reference.model_dir, dtype=dtype, attn_implementation=implementation)
    model = model.to(plan.device).eval()
    forward = forward_parity(model, reference, plan.device, dtype)
    generation = generation_agreement(model, reference, plan.device, dtype, plan.fixture_runs, budget)
    return dict(forward=forward, generation=generation, seconds=time.perf_counter() - start)


def run_fixtures(run: Run, record: dict) -> None:
    """Backend by backend in the plan's order of value (sdpa first), float32 (the parity claim: token-exact) then
    bfloat16 (the released dtype: agreement); flash attention in bfloat16 only (its kernels take no float32)."""
    installed = installed_flash_backends()
    record["combos"] = combos = []
    plan = run.plan
    references = all_sets()
    if not references:
        raise ValueError("No reference fixture set found: expected tests/fixtures/reference-*/cases.json (or set "
                         "DIMPLE_REFERENCE_FIXTURES to a fixture folder).")
    for backend in plan.fixture_backends:
        flash = backend.startswith("flash_attention")
        for dtype in (torch.bfloat16,) if flash else (torch.float32, torch.bfloat16):
            for reference in references:
                row = dict(set=reference.name, attention=backend, dtype=str(dtype).removeprefix("torch."))
                if flash and backend not in installed:
                    combos.append({**row, "error": "not installed"})
                    continue
                run.budget.require(1, f"the fixtures with {backend} in {row['dtype']}")
                attempt(combos, row, fixture_combo, plan, run.budget, reference, backend, dtype)


def render_fixtures(record: dict) -> str:
    def measured(row: dict) -> list[str]:
        forward, generation = row["forward"], row["generation"]
        cut = "" if generation["runs"] == generation["planned_runs"] else f" (of {generation['planned_runs']})"
        return [f"{forward['within_tolerance']}/{forward['cases']}", f"{forward['max_abs_diff']:.2e}",
                f"{forward['argmax_agreement']:.1%}", f"{generation['token_exact']}/{generation['runs']}{cut}",
                f"{generation['token_agreement']:.1%}", f"{row['seconds']:.1f}"]

    columns = ("set", "attention", "dtype", "forward cases within tolerance", "max abs logit diff",
               "top-token agreement", "generation runs token-exact", "answer-token agreement", "s")
    lines = table(columns, record.get("combos", []), lambda row: [row["set"], row["attention"], row["dtype"]],
                  measured)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------------
# 4. the physical limit
# ------------------------------------------------------------------------------------------------------------------


def copy_bandwidth(device: str, size: int) -> float:
    """Bytes per second of a device-to-device copy of `size` bytes of random data, counting bytes read plus bytes
    written (the convention of published device bandwidths)."""
    source = torch.rand(size // 4, device=device)
    target = torch.empty_like(source)
    return 2 * size / bench.median_seconds(lambda: target.copy_(source))


def matmul_rate(device: str, size: int, dtype: torch.dtype) -> float:
    """FLOP per second of a `size`-cubed matrix product on random data (zeros run faster than real data)."""
    left = torch.randn(size, size, device=device, dtype=dtype)
    right = torch.randn_like(left)
    return 2 * size**3 / bench.median_seconds(lambda: left @ right)


def run_floor(run: Run, record: dict) -> None:
    """Measure the two ceilings no step can beat: a large device-to-device copy and a large matrix product on random
    data; count the bytes one decoder step must stream (weights of the decoder layers and the LM head; the embedding
    is only gathered) on a model built on the meta device, so nothing is allocated."""
    plan = run.plan
    skeleton = bench.build(plan.size, plan.dtype, "meta")
    config = skeleton.config
    streamed = sum(parameter.numel() for name, parameter in skeleton.model.named_parameters()
                   if not name.startswith("embed_tokens")) + skeleton.lm_head.weight.numel()
    value_bytes = torch.finfo(plan.dtype).bits // 8
    head_dim = config.hidden_size // config.num_attention_heads
    run.physics = dict(
        bandwidth=copy_bandwidth(plan.device, plan.copy_bytes),
        flops_per_s=matmul_rate(plan.device, plan.matmul_size, plan.dtype),
        weight_bytes=streamed * value_bytes,
        kv_bytes_per_token=config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * value_bytes,
    )
    record.update(copy_gib=plan.copy_bytes / 2**30, bandwidth_gb_s=run.physics["bandwidth"] / 1e9,
                  matmul_size=plan.matmul_size, matmul_dtype=str(plan.dtype).removeprefix("torch."),
                  matmul_tflop_s=run.physics["flops_per_s"] / 1e12, streamed_parameters=streamed,
                  weight_gb=run.physics["weight_bytes"] / 1e9,
                  weight_floor_ms=run.physics["weight_bytes"] / run.physics["bandwidth"] * 1e3,
                  size=plan.size)


def render_floor(record: dict) -> str:
    if "bandwidth_gb_s" not in record:
        return ""
    return (f"- Copy bandwidth {record['bandwidth_gb_s']:.0f} GB/s ({record['copy_gib']:.3g} GiB copy, bytes read + "
            f"written); {record['matmul_dtype']} matrix product {record['matmul_tflop_s']:.3g} TFLOP/s "
            f"({record['matmul_size']}^3, random data).\n"
            f"- `{record['size']}` step streams {record['streamed_parameters'] / 1e6:,.1f}M parameters (decoder + LM "
            f"head) = {record['weight_gb']:.3g} GB: weight-streaming floor **{record['weight_floor_ms']:.3g} ms** "
            "per step at batch 1. Each timed step below is read against max(bytes / bandwidth, FLOPs / matrix "
            "rate) for its own window.\n")


def step_floor(physics: dict, config, batch: int, queries: int, keys: int, head_rows: float,
               cached_keys: int) -> float | None:
    """Least seconds one step can take here: its weights plus the cached keys/values it reads, streamed once at the
    measured bandwidth, or its FLOPs (bench_generate.forward_flops, checked against torch's counter) at the
    measured matrix rate, whichever is longer."""
    if not physics:
        return None
    streamed = physics["weight_bytes"] + batch * cached_keys * physics["kv_bytes_per_token"]
    flops = batch * bench.forward_flops(config, queries, keys, 0) + bench.forward_flops(config, 0, 0, head_rows)
    return max(streamed / physics["bandwidth"], flops / physics["flops_per_s"])


# ------------------------------------------------------------------------------------------------------------------
# 5. per-step latency at 7B
# ------------------------------------------------------------------------------------------------------------------


def cache_modes(block: int) -> dict[str, dict]:
    """bench_generate's three eager modes, keyed by the cache they use."""
    names = dict(zip(CACHE_MODES, bench.dimple_modes(0, block, with_compile=False).items(), strict=True))
    return {cache: dict(name=name, settings=settings) for cache, (name, settings) in names.items()}


def step_row(run: Run, batch: int, answer: int, tokens_per_step: int, cache: str, settings: dict) -> dict:
    """Time one decoding setting and read it against the floor of its typical later step."""
    model = run.dimple()
    inputs = run.prompt(batch)
    full = dict(max_new_tokens=answer, steps=max(1, answer // tokens_per_step), alg_p_threshold=None, **settings)
    result = bench.time_dimple(model, inputs, full, run.plan.runs)
    prompt_len = inputs["input_ids"].shape[1]
    total = prompt_len + answer
    queries = dict(none=total, prefix=answer + 1, dual=min(run.plan.block, answer) + 1)[cache]
    floor = step_floor(run.physics, model.config, batch, queries, total, result["rows"],
                       0 if cache == "none" else total)
    return dict(prompt_tokens=prompt_len, forwards=result["forwards"], tokens_per_forward=answer / result["forwards"],
                first_ms=result["first"] * 1e3,
                per_step_ms=bench.per_step(result) * 1e3, median_step_ms=result["median_step"] * 1e3,
                total_ms=result["total"] * 1e3, tok_s=batch * answer / result["total"], peak_gib=result["peak"],
                warm_up_s=result["warm_up"], floor_ms=None if floor is None else floor * 1e3,
                vs_floor=None if floor is None else result["median_step"] / floor)


def step_row_with_attention(run: Run, backend: str, cache: str, settings: dict) -> dict:
    """step_row at the tokens-per-second answer length with another attention implementation (the caller switches
    back to sdpa)."""
    run.dimple().set_attn_implementation(backend)
    return step_row(run, 1, run.plan.tps_answer, 3, cache, settings)


def run_steps(run: Run, record: dict) -> None:
    """Value order: the eager grid (cheap), other attention backends, then the compiled modes (each a compile of
    the model, a minute or more at 7B) at the tokens-per-second answer length, so that section can reuse them."""
    plan = run.plan
    start = bench.synchronized_clock()
    model = run.dimple()
    record.update(build_s=bench.synchronized_clock() - start, parameters=sum(p.numel() for p in model.parameters()),
                  size=plan.size, dtype=str(plan.dtype).removeprefix("torch."), block=plan.block)
    record["rows"] = rows = []
    modes = cache_modes(plan.block)
    for answer in plan.answers:
        for cache, mode in modes.items():
            run.budget.require(1, f"{mode['name']} at {answer} tokens")
            row = dict(answer=answer, cache=cache, mode=mode["name"], compile="eager", attention="sdpa", batch=1)
            attempt(rows, row, step_row, run, 1, answer, 3, cache, mode["settings"])
    if not any(row["answer"] == plan.tps_answer for row in rows):
        for cache in ("prefix", "dual"):  # the eager sdpa baseline of the backend and compile comparisons
            run.budget.require(1, f"{modes[cache]['name']} at {plan.tps_answer} tokens")
            row = dict(answer=plan.tps_answer, cache=cache, mode=modes[cache]["name"], compile="eager",
                       attention="sdpa", batch=1)
            attempt(rows, row, step_row, run, 1, plan.tps_answer, 3, cache, modes[cache]["settings"])
    backends = plan.timing_backends or ("sdpa", *installed_flash_backends())
    try:
        for backend in backends[1:]:
            for cache in ("prefix", "dual"):
                run.budget.require(1, f"{backend} attention")
                row = dict(answer=plan.tps_answer, cache=cache, mode=modes[cache]["name"], compile="eager",
                           attention=backend, batch=1)
                attempt(rows, row, step_row_with_attention, run, backend, cache, modes[cache]["settings"])
    finally:
        model.set_attn_implementation("sdpa")
    for label, compile_config in plan.compile_configs.items():
        for cache in ("prefix", "dual"):
            run.budget.require(plan.compile_needs_s, f"{label} with the {cache} cache")
            settings = {**modes[cache]["settings"], "compile_forward": True, "compile_config": compile_config}
            row = dict(answer=plan.tps_answer, cache=cache, mode=modes[cache]["name"], compile=label,
                       attention="sdpa", batch=1, compile_config=compile_config.to_dict())
            if "error" not in attempt(rows, row, step_row, run, 1, plan.tps_answer, 3, cache, settings):
                run.compiled.add((label, cache))


def render_steps(record: dict) -> str:
    if "rows" not in record:
        return ""
    lines = [f"`{record['size']}` = {record['parameters'] / 1e6:,.1f}M parameters, {record['dtype']}, random weights "
             f"built on the device in {record['build_s']:.1f} s; batch 1, ~3 tokens/step by schedule, no threshold, "
             f"dual-cache block {record['block']}. Median step = typical step after the first; floor = its own "
             "floor (section above).", ""]
    columns = ("answer", "mode", "compile", "attention", "forwards", "first step ms", "mean later step ms",
               "median step ms", "floor ms", "median / floor", "total ms", "answer tok/s", "peak GiB", "warm-up s")
    lines += table(columns, record["rows"], lambda row: [str(row["answer"]), row["mode"], row["compile"],
                                                         row["attention"]],
                   lambda row: [str(row["forwards"]), f"{row['first_ms']:.1f}", f"{row['per_step_ms']:.2f}",
                                f"{row['median_step_ms']:.2f}", fmt(row["floor_ms"], 2), fmt(row["vs_floor"], 2, "x"),
                                f"{row['total_ms']:.0f}", f"{row['tok_s']:.1f}", fmt(row["peak_gib"], 1),
                                f"{row['warm_up_s']:.1f}"])
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------------
# 6. tokens per second against the autoregressive peer
# ------------------------------------------------------------------------------------------------------------------


def peer_row(run: Run, batch: int) -> dict:
    """The autoregressive peer decoding the same answer length from the same prompt (one forward per token)."""
    answer = run.plan.tps_answer
    result = bench.time_peer(run.peer(), run.prompt(batch), answer, run.plan.runs)
    return dict(forwards=result["forwards"], tokens_per_forward=answer / result["forwards"],
                total_ms=result["total"] * 1e3, tok_s=batch * answer / result["total"],
                median_step_ms=result["median_step"] * 1e3)


def versus_peer(run: Run, peer: dict, batch: int, tokens_per_step: int, cache: str, settings: dict) -> dict:
    """step_row at the tokens-per-second answer length, with its speed relative to the peer's row."""
    measured = step_row(run, batch, run.plan.tps_answer, tokens_per_step, cache, settings)
    if "tok_s" in peer:
        measured["vs_peer"] = measured["tok_s"] / peer["tok_s"]
    return measured


def run_tps(run: Run, record: dict) -> None:
    """Per batch size: the peer once, then Dimple at 3, 2 and 1 tokens per step (steps = answer // k), in both cache
    modes eagerly, and at batch 1 also with the forwards the steps section compiled in the first (most valuable)
    compile mode: the window shapes are the same, so nothing compiles again."""
    plan = run.plan
    modes = cache_modes(plan.block)
    record.update(answer=plan.tps_answer, block=plan.block)
    record["rows"] = rows = []
    for batch in plan.batch_sizes:
        run.budget.require(1, f"the autoregressive peer at batch {batch}")
        peer = attempt(rows, dict(batch=batch, mode="AR peer (Qwen2.5-VL, KV cache)", compile="eager",
                                  tokens_per_step=1), peer_row, run, batch)
        variants = [("eager", cache, modes[cache]["settings"]) for cache in ("prefix", "dual")]
        if batch == 1:
            variants += [(label, cache, {**modes[cache]["settings"], "compile_forward": True,
                                         "compile_config": plan.compile_configs[label]})
                         for label, cache in sorted(run.compiled) if label == next(iter(plan.compile_configs))]
        for tokens_per_step in plan.tokens_per_step:
            for label, cache, settings in variants:
                run.budget.require(1, f"{modes[cache]['name']} at batch {batch}, {tokens_per_step} tokens/step")
                row = dict(batch=batch, mode=modes[cache]["name"], cache=cache, compile=label,
                           tokens_per_step=tokens_per_step)
                attempt(rows, row, versus_peer, run, peer, batch, tokens_per_step, cache, settings)


def render_tps(record: dict) -> str:
    if "rows" not in record:
        return ""
    lines = [f"{record['answer']}-token answers, tokens/s = batch x answer / total time (first step and prompt "
             "included for both). Tokens per step are set by the schedule (steps = answer // k, no threshold); "
             "the pace it gives is answer / forwards.", ""]
    columns = ("batch", "tokens/step", "answer / forwards", "mode", "compile", "forwards", "median step ms", "total ms",
               "answer tok/s", "vs AR peer")
    lines += table(columns, record["rows"],
                   lambda row: [str(row["batch"]), str(row["tokens_per_step"]), fmt(row.get("tokens_per_forward"), 2),
                                row["mode"], row["compile"]],
                   lambda row: [str(row["forwards"]), f"{row['median_step_ms']:.2f}", f"{row['total_ms']:.0f}",
                                f"{row['tok_s']:.1f}", fmt(row.get("vs_peer"), 2, "x")])
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------------
# 7. concurrent clients: the batching engine against one by one
# ------------------------------------------------------------------------------------------------------------------


def run_engine(run: Run, record: dict) -> None:
    """Per client count (fewest first): the same requests one by one with generate(), then submitted at once to the
    batching engine (bench_engine.measure). Random weights: the schedule fixes ~3 tokens per step (no threshold);
    whether each engine answer equals its solo answer is reported, not required (bfloat16 kernels may round a
    batch differently). Imported here, so that a fault in the engine stops only this section."""
    import bench_engine

    plan = run.plan
    settings = dict(max_new_tokens=plan.engine_answer, steps=max(1, plan.engine_answer // 3), alg_p_threshold=None)
    requests = [run.prompt(1)]
    record.update(answer=plan.engine_answer, prompt_tokens=requests[0]["input_ids"].shape[1],
                  max_batch_size=max(plan.engine_clients))
    record["rows"] = rows = []
    for clients in plan.engine_clients:
        run.budget.require(1, f"{clients} concurrent clients")
        try:
            rows += bench_engine.measure(run.dimple(), requests, [clients], settings, max(plan.engine_clients), 1)
        except Exception as error:  # e.g. out of memory at the most clients: the smaller counts stay measured
            rows.append(dict(clients=clients, error=f"{type(error).__name__}: {str(error)[:200]}"))


def render_engine(record: dict) -> str:
    if "rows" not in record:
        return ""
    lines = [f"{record['prompt_tokens']}-token prompt (one image), {record['answer']}-token answers, ~3 tokens/step "
             "by schedule; N clients send one request each at once. One by one: generate() per request in turn "
             f"(latency includes the wait); engine: max batch {record['max_batch_size']}, each step's forward passes "
             "shared by every active request. Speed-up = one-by-one wall time / engine wall time.", ""]
    from bench_engine import render_rows

    lines += render_rows([row for row in record["rows"] if "error" not in row])
    lines += [f"- {row['clients']} clients: {row['error']}" for row in record["rows"] if "error" in row]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """One part of the run: `run` fills its record (so what it measured survives a stop), `render` turns any
    record, partial ones included, into markdown."""

    name: str
    title: str
    run: Callable[[Run, dict], None]
    render: Callable[[dict], str]


SECTIONS = (
    Section("env", "Environment", run_env, render_env),
    Section("cuda_tests", "CUDA tests", run_cuda_tests, render_cuda_tests),
    Section("fixtures", "Reference fixtures on the device", run_fixtures, render_fixtures),
    Section("floor", "Physical limit", run_floor, render_floor),
    Section("steps", "Per-step latency", run_steps, render_steps),
    Section("engine", "Concurrent clients: batching engine vs one by one", run_engine, render_engine),
    Section("tps", "Tokens per second vs the autoregressive peer", run_tps, render_tps),
)


def goals(sections: dict) -> list[dict]:
    """The three CUDA goals of the module docstring, read off the measured rows (None where a number is missing)."""
    steps = [row for row in sections.get("steps", {}).get("rows", []) if row.get("vs_floor") is not None]
    cached = [row for row in steps if row["cache"] != "none"]
    best = min(cached, key=lambda row: row["vs_floor"], default=None)
    found = [dict(goal="cached step latency vs the measured floor", target="<= 1.30x",
                  measured=None if best is None else best["vs_floor"],
                  where=None if best is None else f"{best['mode']}, {best['compile']}, {best['answer']} tokens",
                  met=None if best is None else best["vs_floor"] <= 1.3)]
    tps = sections.get("tps", {}).get("rows", [])
    peer = next((row for row in tps if row["batch"] == 1 and "AR peer" in row["mode"] and "tok_s" in row), None)
    ours = [row for row in tps if row["batch"] == 1 and row["tokens_per_step"] == 3 and "vs_peer" in row]
    fastest = max(ours, key=lambda row: row["vs_peer"], default=None)
    found.append(dict(goal="batch-1 tokens/s vs the AR peer at 3 tokens/step", target=">= 2.00x",
                      measured=None if fastest is None else fastest["vs_peer"],
                      where=None if fastest is None else f"{fastest['mode']}, {fastest['compile']}",
                      met=None if fastest is None or peer is None else fastest["vs_peer"] >= 2))
    eager = {(row["attention"], row["cache"], row["answer"]): row for row in steps if row["compile"] == "eager"}
    for (backend, cache, answer), row in sorted(eager.items()):
        sdpa = eager.get(("sdpa", cache, answer))
        if backend != "sdpa" and sdpa is not None:
            speed = sdpa["median_step_ms"] / row["median_step_ms"]
            found.append(dict(goal=f"{backend} step speed vs sdpa", target=">= 1.00x", measured=speed,
                              where=f"{row['mode']}, {answer} tokens", met=speed >= 1))
    if not any(goal["goal"].startswith("flash") for goal in found):
        found.append(dict(goal="flash attention step speed vs sdpa", target=">= 1.00x", measured=None,
                          where="no flash-attention package installed", met=None))
    engine = [row for row in sections.get("engine", {}).get("rows", []) if row.get("speedup") is not None]
    most = max(engine, key=lambda row: row["clients"], default=None)
    found.append(dict(goal="engine wall time vs one by one at the most clients", target=">= 2.00x",
                      measured=None if most is None else most["speedup"],
                      where=None if most is None else f"{most['clients']} clients",
                      met=None if most is None else most["speedup"] >= 2))
    return found


def render_goals(found: list[dict]) -> str:
    lines = ["| goal | target | measured | where | met |", "|---|---|---|---|---|"]
    for goal in found:
        met = {True: "yes", False: "**no**", None: "not measured"}[goal["met"]]
        lines.append(f"| {goal['goal']} | {goal['target']} | {fmt(goal['measured'], 2, 'x')} | "
                     f"{goal['where'] or '—'} | {met} |")
    return "\n".join(lines) + "\n"


def render(report: dict) -> str:
    env = report["sections"].get("env", {})
    machine = env.get("gpu") or f"{env.get('cpu', 'CPU')} CPU"
    lines = [f"\n### {report['started'][:10]} — one prepared GPU run (`benchmarks/gpu_run.py"
             f"{' --dry-run' if report['dry_run'] else ''}`): {machine}, torch {env.get('torch')}, transformers "
             f"{env.get('transformers')}; {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget\n"]
    if report["dry_run"]:
        lines.append("Dry run: tiny sizes on the CPU, to show every path runs; the numbers mean nothing.\n")
    for section in SECTIONS:
        record = report["sections"].get(section.name)
        if record is None:
            continue
        status = "" if record["status"] == "done" else f" — {record['status']}"
        lines.append(f"#### {section.title} ({record.get('seconds', 0):.0f} s){status}\n")
        lines.append(section.render(record))
    lines.append("#### Goals\n")
    lines.append(render_goals(report["goals"]))
    return "\n".join(lines)


def run_sections(plan: Plan, budget: Budget, names: list[str], sections: tuple[Section, ...],
                 save: Callable[[dict], None], dry_run: bool) -> dict:
    """Each section within its own cap and what is left of the run's budget. `env` always runs (the report is
    not readable without it); a section that runs out of time keeps what it measured, the ones after it are
    skipped once the run's budget is spent, and an error stops only its own section (its traceback goes into
    the JSON). The report is saved after every section."""
    report = dict(started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  dry_run=dry_run, budget_s=budget.seconds, argv=sys.argv[1:], sections={}, goals=[])
    run = Run(plan, budget)
    for section in sections:
        if section.name not in names:
            continue
        record = report["sections"][section.name] = {}
        if section.name != "env" and budget.left() <= 0:
            record["status"] = "skipped: the run's budget is spent"
        else:
            run.budget = Budget(min(plan.section_caps[section.name], max(budget.left(), 0)))
            start = time.monotonic()
            try:
                section.run(run, record)
                record["status"] = "done"
            except OutOfTime as stop:
                record["status"] = f"stopped: {stop}"
            except Exception as error:
                record["status"] = f"error: {type(error).__name__}: {str(error)[:300]}"
                record["traceback"] = traceback.format_exc()[-3000:]
            record["seconds"] = time.monotonic() - start
        report["elapsed_s"] = budget.seconds - budget.left()
        report["goals"] = goals(report["sections"])
        save(report)
        print(f"gpu_run: {section.name} {record['status']} ({record.get('seconds', 0):.0f} s)", file=sys.stderr,
              flush=True)
    return report


def saver(out: Path, stamp: str) -> Callable[[dict], None]:
    """Rewrites `out`/RESULTS.md (what it held before + this run's section) and `out`/gpu_run-<stamp>.json, each
    atomically, so every save leaves both files whole."""
    out.mkdir(parents=True, exist_ok=True)
    results = out / "RESULTS.md"
    before = results.read_text(encoding="utf-8") if results.exists() else ""
    data = out / f"gpu_run-{stamp}.json"

    def save(report: dict) -> None:
        write_atomically(results, before + render(report))
        write_atomically(data, json.dumps(report, indent=1, default=str) + "\n")

    return save


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: every path, in about a minute")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of RESULTS.md (appended to) and the JSON report (default: benchmarks/; for "
                             "--dry-run a new temporary folder, so a rehearsal never changes the checkout)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="seconds for the sections (default 450: with imports and the final write, the "
                             "command fits in 8 minutes)")
    parser.add_argument("--sections", nargs="+", choices=[section.name for section in SECTIONS],
                        default=[section.name for section in SECTIONS],
                        help="run only these (e.g. to redo what a first run had no time for)")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        raise ValueError(f"--budget-s must be positive seconds, got {args.budget_s}; the default is 450.")
    if not args.dry_run and not torch.cuda.is_available():
        raise ValueError("No CUDA device is visible: this run is meant for a GPU. Use --dry-run to rehearse it on "
                         "the CPU.")
    transformers.logging.set_verbosity_error()  # fixture runs warn about unfilled masks by design
    plan = dry_run_plan() if args.dry_run else gpu_plan()
    if args.dry_run:
        torch.set_num_threads(1)  # tiny sizes gain nothing from threads, and on a busy machine their barriers stall
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    out = args.out
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="gpu_run-dry-run-")) if args.dry_run else Path(__file__).resolve().parent
    print(f"gpu_run: writing RESULTS.md and gpu_run-{stamp}.json into {out}", file=sys.stderr, flush=True)
    save = saver(out, stamp)
    report = run_sections(plan, Budget(args.budget_s), args.sections, SECTIONS, save, args.dry_run)
    print(render(report), flush=True)
    return 1 if any(record["status"].startswith("error") for record in report["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
