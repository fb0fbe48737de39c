"""The engine's benchmarks run and report what they claim: benchmarks/bench_engine.py on the bundled model, the
prepared GPU run's engine section in its CPU dry run, and a dry run without `--out` leaves the checkout untouched."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"


def run_script(script: str, *arguments: str, tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TMPDIR=str(tmp))
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *arguments], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def snapshot(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir() if path.is_file()}


def table_rows(markdown: str) -> list[list[str]]:
    """Cells of the markdown table rows that follow a header starting with `| clients |`."""
    lines = markdown.split("| clients |", 1)[1].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_a_dry_run_without_out_writes_into_a_temporary_folder_only(tmp_path):
    before = snapshot(BENCHMARKS)
    finished = run_script("gpu_run.py", "--dry-run", "--sections", "env", tmp=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert snapshot(BENCHMARKS) == before
    [folder] = tmp_path.glob("gpu_run-dry-run-*")
    assert str(folder) in finished.stderr
    assert (folder / "RESULTS.md").read_text(encoding="utf-8").startswith("\n### ")
    assert len(list(folder.glob("gpu_run-*.json"))) == 1


def test_the_gpu_runs_engine_section_measures_every_client_count_in_its_dry_run(tmp_path):
    out = tmp_path / "out"
    finished = run_script("gpu_run.py", "--dry-run", "--sections", "env", "engine", "--out", str(out), tmp=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    [report_file] = out.glob("gpu_run-*.json")
    report = json.loads(report_file.read_text())
    engine = report["sections"]["engine"]
    assert engine["status"] == "done"
    rows = engine["rows"]
    assert [(row["clients"], row["mode"].split(",")[0]) for row in rows] == [
        (1, "one by one (generate)"), (1, "engine"), (2, "one by one (generate)"), (2, "engine")]
    for row in rows:
        assert row["wall"] > 0 and 0 < row["p50_ms"] <= row["p95_ms"] <= row["wall"] * 1e3 + 1e-6
        assert row["equal"] == row["clients"]  # float32 on the CPU: every answer is its solo answer
        if "engine" in row["mode"]:
            one_by_one = next(base for base in rows if base["clients"] == row["clients"] and base is not row)
            assert abs(row["speedup"] - one_by_one["wall"] / row["wall"]) < 1e-9
    [goal] = [goal for goal in report["goals"] if goal["goal"].startswith("engine")]
    assert goal["measured"] == rows[-1]["speedup"] and goal["where"] == "2 clients"
    markdown = (out / "RESULTS.md").read_text(encoding="utf-8")
    assert "#### Concurrent clients: batching engine vs one by one" in markdown
    assert len(table_rows(markdown.split("#### Concurrent clients", 1)[1])) == 4


def test_bench_engine_appends_a_table_of_every_client_count(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# earlier results\n", encoding="utf-8")
    finished = run_script("bench_engine.py", "--clients", "1", "3", "--repeats", "1", "--out", str(results),
                          tmp=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    markdown = results.read_text(encoding="utf-8")
    assert markdown.startswith("# earlier results\n") and "batching engine vs one by one" in markdown
    rows = table_rows(markdown)
    assert [(row[0], row[1].split(",")[0]) for row in rows] == [
        ("1", "one by one (generate)"), ("1", "engine"),
        ("3", "one by one (generate)"), ("3", "engine"), ("3", "one padded batch (generate)")]
    assert [row[-1] for row in rows] == ["1/1", "1/1", "3/3", "3/3", "3/3"]
    assert [row[7] == "—" for row in rows] == [True, False, True, False, False]
    assert all(row[7].endswith("x") for row in rows if row[7] != "—")
