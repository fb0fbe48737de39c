"""The revision comparison benchmark runs each revision from its own git worktree and reports matching tokens.

It is what a refactor's "tokens and speed unchanged" claim rests on, so it runs here end to end on one revision
against itself (one call, one round): every mode must report the same tokens, its worktrees must be gone after, and
the table must land in the file given by `--out` only.
"""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def is_git_checkout() -> bool:
    probe = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not is_git_checkout(), reason="compares git revisions; this copy is not a git checkout")
def test_a_revision_against_itself_gives_the_same_tokens(tmp_path):
    out = tmp_path / "results.md"
    worktrees_before = subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True)
    result = subprocess.run(
        [sys.executable, "benchmarks/compare_revisions.py", "HEAD", "HEAD", "--calls", "1", "--rounds", "1",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "ms" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| prefix cache", "| no cache", "| dual cache, block 4"]
    assert all(row.endswith("| yes |") for row in rows), rows
    worktrees_after = subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True)
    assert worktrees_after.stdout == worktrees_before.stdout
