"""The prepared GPU run (benchmarks/gpu_run.py) cannot rot: its CPU dry run executes every section here.

A GPU is lent only for minutes, so a script that first fails on the GPU wastes the loan. The dry run takes the same
code paths on tiny sizes; these tests check that every section ran and reported numbers that mean what they say,
that the report survives a budget that runs out, and that the repository's own RESULTS.md is never touched.
"""

import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_run.py"
REPO_RESULTS = REPO / "benchmarks" / "RESULTS.md"


def load_gpu_run():
    spec = importlib.util.spec_from_file_location("gpu_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_run = load_gpu_run()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dry_run(out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    """Run the script as the GPU machine would, but with --dry-run; return the process, its JSON and its markdown."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    finished = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *extra], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=900)
    reports = sorted(out.glob("gpu_run-*.json"))
    assert len(reports) == 1, finished.stderr[-3000:]
    return finished, json.loads(reports[0].read_text()), (out / "RESULTS.md").read_text(encoding="utf-8")


def positive(*values: float) -> bool:
    return all(isinstance(value, (int, float)) and math.isfinite(value) and value > 0 for value in values)


def scheduled_forwards(answer: int, tokens_per_step: int) -> int:
    """Forwards the schedule allows: steps = answer // k, a total that the blocks of every cache mode share."""
    return max(1, answer // tokens_per_step)


@pytest.fixture(scope="module")
def full_dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dry_run")
    before = digest(REPO_RESULTS)
    finished, report, markdown = dry_run(out)
    return finished, report, markdown, before


def test_dry_run_runs_every_section_to_the_end(full_dry_run):
    finished, report, markdown, _ = full_dry_run
    assert finished.returncode == 0, finished.stderr[-3000:]
    statuses = {name: record["status"] for name, record in report["sections"].items()}
    assert statuses == {section.name: "done" for section in gpu_run.SECTIONS}
    assert report["dry_run"] is True and 0 < report["elapsed_s"] < report["budget_s"]
    for section in gpu_run.SECTIONS:
        assert f"#### {section.title} (" in markdown
    assert "#### Goals" in markdown


def test_dry_run_never_touches_the_repository_results(full_dry_run):
    *_, before = full_dry_run
    assert digest(REPO_RESULTS) == before


def test_environment_and_cuda_tests_are_reported(full_dry_run):
    _, report, _, _ = full_dry_run
    env, tests = report["sections"]["env"], report["sections"]["cuda_tests"]
    assert env["torch"] == torch.__version__ and env["cpu_threads"] >= 1
    assert set(env["attention_packages"]) == set(gpu_run.ATTENTION_DISTRIBUTIONS)
    assert tests["returncode"] == 0 and not tests["timed_out"]
    if torch.cuda.is_available():
        assert tests["passed"] > 0 and tests["failed"] == tests["errors"] == 0
    else:  # every CUDA test is collected and skipped on a CPU machine
        assert tests["skipped"] > 0 and tests["passed"] == tests["failed"] == tests["errors"] == 0


def test_reference_fixtures_are_token_exact_in_float32_and_measured_in_bfloat16(full_dry_run):
    _, report, _, _ = full_dry_run
    combos = report["sections"]["fixtures"]["combos"]
    measured = {(row["attention"], row["dtype"]): row for row in combos if "error" not in row}
    assert set(measured) == {("sdpa", "float32"), ("sdpa", "bfloat16")}
    for (_, dtype), row in measured.items():
        forward, generation = row["forward"], row["generation"]
        assert forward["cases"] > 0
        assert generation["runs"] == generation["planned_runs"] == gpu_run.dry_run_plan().fixture_runs
        assert 0 <= forward["argmax_agreement"] <= 1 and 0 <= generation["token_agreement"] <= 1
        if dtype == "float32":
            assert forward["within_tolerance"] == forward["cases"]
            assert generation["token_exact"] == generation["runs"]
    flash = [row for row in combos if row["attention"] == "flash_attention_2"]
    assert [row["dtype"] for row in flash] == ["bfloat16"]  # flash kernels take no float32
    if "flash_attention_2" not in gpu_run.installed_flash_backends():
        assert flash[0]["error"] == "not installed"


def test_floor_counts_the_decoder_and_lm_head_weights(full_dry_run):
    _, report, _, _ = full_dry_run
    floor = report["sections"]["floor"]
    model = gpu_run.bench.build("tiny", torch.float32, "meta")
    streamed = sum(p.numel() for p in model.model.layers.parameters()) + sum(
        p.numel() for p in model.model.norm.parameters()) + model.lm_head.weight.numel()
    assert floor["streamed_parameters"] == streamed
    assert floor["weight_gb"] == pytest.approx(streamed * 4 / 1e9)
    assert positive(floor["bandwidth_gb_s"], floor["matmul_tflop_s"], floor["weight_floor_ms"])
    assert floor["weight_floor_ms"] == pytest.approx(floor["weight_gb"] / floor["bandwidth_gb_s"] * 1e3)


def test_steps_cover_every_mode_answer_backend_and_compile_setting(full_dry_run):
    _, report, _, _ = full_dry_run
    plan = gpu_run.dry_run_plan()
    rows = report["sections"]["steps"]["rows"]
    assert not [row for row in rows if "error" in row]
    seen = {(row["answer"], row["cache"], row["compile"], row["attention"]) for row in rows}
    for answer in plan.answers:
        assert {(answer, cache, "eager", "sdpa") for cache in gpu_run.CACHE_MODES} <= seen
    for cache in ("prefix", "dual"):
        assert (plan.tps_answer, cache, "eager", "eager") in seen
        for label in plan.compile_configs:
            assert (plan.tps_answer, cache, label, "sdpa") in seen
    for row in rows:
        assert positive(row["first_ms"], row["per_step_ms"], row["median_step_ms"], row["total_ms"], row["tok_s"],
                        row["floor_ms"], row["vs_floor"])
        assert row["forwards"] == scheduled_forwards(row["answer"], 3)


def test_tokens_per_second_compare_each_schedule_and_batch_with_the_peer(full_dry_run):
    _, report, _, _ = full_dry_run
    plan = gpu_run.dry_run_plan()
    rows = report["sections"]["tps"]["rows"]
    assert not [row for row in rows if "error" in row]
    for batch in plan.batch_sizes:
        peer = [row for row in rows if row["batch"] == batch and "AR peer" in row["mode"]]
        assert len(peer) == 1 and peer[0]["forwards"] == plan.tps_answer and positive(peer[0]["tok_s"])
        for tokens_per_step in plan.tokens_per_step:
            ours = [row for row in rows if row["batch"] == batch and row["tokens_per_step"] == tokens_per_step
                    and "AR peer" not in row["mode"]]
            assert {(row["cache"], row["compile"]) for row in ours if row["compile"] == "eager"} == {
                ("prefix", "eager"), ("dual", "eager")}
            for row in ours:
                assert positive(row["tok_s"], row["vs_peer"])
                assert row["tokens_per_forward"] == pytest.approx(plan.tps_answer / row["forwards"])
                assert row["forwards"] <= scheduled_forwards(plan.tps_answer, tokens_per_step)
                assert row["vs_peer"] == pytest.approx(row["tok_s"] / peer[0]["tok_s"])
    compiled = {row["compile"] for row in rows if row["batch"] == 1} - {"eager"}
    assert compiled == {next(iter(plan.compile_configs))}


def test_goals_are_read_off_the_measurements(full_dry_run):
    _, report, markdown, _ = full_dry_run
    goals = {goal["goal"]: goal for goal in report["goals"]}
    floor, speed = goals["cached step latency vs the measured floor"], goals[
        "batch-1 tokens/s vs the AR peer at 3 tokens/step"]
    best = min(row["vs_floor"] for row in report["sections"]["steps"]["rows"] if row["cache"] != "none")
    assert floor["measured"] == best and floor["met"] == (best <= 1.3)
    fastest = max(row["vs_peer"] for row in report["sections"]["tps"]["rows"]
                  if row["batch"] == 1 and row["tokens_per_step"] == 3 and "vs_peer" in row)
    assert speed["measured"] == fastest and speed["met"] == (fastest >= 2)
    assert goals["eager step speed vs sdpa"]["measured"] > 0
    assert "| cached step latency vs the measured floor | <= 1.30x |" in markdown


def test_a_spent_budget_leaves_a_valid_partial_report_after_the_earlier_results(tmp_path):
    (tmp_path / "RESULTS.md").write_text("# Benchmark results\n\nearlier tables\n", encoding="utf-8")
    finished, report, markdown = dry_run(tmp_path, "--budget-s", "0.001")
    assert finished.returncode == 0, finished.stderr[-3000:]
    statuses = {name: record["status"] for name, record in report["sections"].items()}
    assert statuses.pop("env") == "done"  # the header of any report: always measured
    assert set(statuses) == {section.name for section in gpu_run.SECTIONS} - {"env"}
    assert all(status.startswith("skipped") for status in statuses.values())
    assert all(goal["measured"] is None and goal["met"] is None for goal in report["goals"])
    assert markdown.startswith("# Benchmark results\n\nearlier tables\n")
    assert "skipped: the run's budget is spent" in markdown and "not measured" in markdown
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files behind


def test_a_section_out_of_time_keeps_its_numbers_and_an_error_stops_only_its_own(tmp_path):
    def measures_then_runs_out(run, record):
        record["rows"] = [{"measured": 1.0}]
        run.budget.require(1e9, "the next measurement")

    def fails(run, record):
        raise RuntimeError("no kernel image is available")

    def measures(run, record):
        record["value"] = 2.0

    sections = (
        gpu_run.Section("env", "Environment", measures, lambda record: ""),
        gpu_run.Section("steps", "Per-step latency", measures_then_runs_out, lambda record: ""),
        gpu_run.Section("fixtures", "Reference fixtures", fails, lambda record: ""),
        gpu_run.Section("tps", "Tokens per second", measures, lambda record: ""),
    )
    saved = []
    report = gpu_run.run_sections(gpu_run.dry_run_plan(), gpu_run.Budget(60.0), [s.name for s in sections],
                                  sections, saved.append, dry_run=True)
    records = report["sections"]
    assert records["steps"]["status"].startswith("stopped:") and records["steps"]["rows"] == [{"measured": 1.0}]
    assert records["fixtures"]["status"] == "error: RuntimeError: no kernel image is available"
    assert "RuntimeError" in records["fixtures"]["traceback"]
    assert records["tps"]["status"] == "done" and records["tps"]["value"] == 2.0
    assert len(saved) == len(sections)  # the report is saved after every section


def test_fixture_decoding_stops_between_runs_when_the_budget_is_spent():
    """A backend that compiles per shape (flex) must not run past its section's share: the runs done are counted."""
    reference = gpu_run.all_sets()[0]
    model = gpu_run.DimpleModel.from_pretrained(reference.model_dir).eval()
    result = gpu_run.generation_agreement(model, reference, "cpu", torch.float32, None, gpu_run.Budget(0.0))
    assert result["runs"] == result["token_exact"] == 0
    assert result["planned_runs"] == len([run for ref, *run in gpu_run.generation_runs(True) if ref is reference])


def test_without_a_gpu_the_real_run_says_to_rehearse_with_dry_run(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real run would start")
    with pytest.raises(ValueError, match="--dry-run"):
        gpu_run.main(["--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--budget-s"):
        gpu_run.main(["--dry-run", "--budget-s", "0", "--out", str(tmp_path)])
