"""The suite runs from a checkout whatever its folder is called (a clone of the Hub repo is named "Dimple-7B")."""

import shutil
import subprocess
import sys

from conftest import REPO_ROOT


def test_the_suite_runs_in_a_checkout_whose_folder_name_is_not_a_module_name(tmp_path):
    checkout = tmp_path / "Dimple-7B"
    shutil.copytree(
        REPO_ROOT, checkout, ignore=shutil.ignore_patterns(".git", ".upstream", "__pycache__", "*.egg-info")
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_compat.py", "-k", "seam_names"],
        cwd=checkout, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 passed" in result.stdout
