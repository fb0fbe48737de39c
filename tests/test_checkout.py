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


def test_remote_code_imports_only_what_every_transformers_install_has():
    """transformers refuses to load remote code that imports (anywhere in a file) a package the user lacks; the
    files a checkpoint ships may use the standard library and transformers' own hard dependencies only. (An
    `import httpx` for image URLs broke every remote-code load on a fresh install; CI's extras had hidden it.)"""
    from transformers.dynamic_module_utils import get_imports

    required_by_transformers = {"torch", "transformers", "numpy", "PIL", "tokenizers", "safetensors", "huggingface_hub"}
    shipped = sorted((REPO_ROOT / "tiny" / "checkpoint").glob("*.py"))
    assert shipped, "the bundled checkpoint carries its remote code"
    for code_file in shipped:
        foreign = set(get_imports(code_file)) - required_by_transformers - set(sys.stdlib_module_names)
        assert not foreign, f"{code_file.name} imports {sorted(foreign)}"
