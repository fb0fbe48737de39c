"""Run Python in a fresh interpreter where the `dimple` package cannot be imported.

The package is editable-installed, so neither `-I` nor a foreign working directory hides it; a meta-path finder
installed before the script runs refuses `dimple`, so remote-code classes can only come from the checkpoint
folder (`transformers_modules`), as for a Hub user without the package. transformers deprecation warnings raised
from that remote code (or about the renamed cache argument) are errors there, as in the suite.
"""

import os
import subprocess
import sys
from pathlib import Path

HIDE_DIMPLE = '''
import importlib.abc, sys
class _HideDimple(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "dimple" or name.startswith("dimple."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
        return None
sys.meta_path.insert(0, _HideDimple())
import warnings
for _category in (FutureWarning, DeprecationWarning):
    warnings.filterwarnings("error", category=_category, module="transformers_modules")
warnings.filterwarnings("error", message=".*(past_key_values|cache_params)", category=FutureWarning)
'''


def run_without_dimple(
    script: str, workdir: Path, timeout: int = 300, args: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """Run `script` (with `args` as sys.argv[1:]) offline with a private module cache in `workdir`."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_MODULES_CACHE=str(workdir / "hf_modules"),
        TRANSFORMERS_VERBOSITY="error",
        TOKENIZERS_PARALLELISM="false",
    )
    return subprocess.run(
        [sys.executable, "-c", HIDE_DIMPLE + script, *args], cwd=workdir, env=env, capture_output=True, text=True,
        timeout=timeout,
    )
