"""Every ```python block of README.md runs, in order and in one namespace, against a tiny local checkpoint.

Only the model id `rp-yu/Dimple-7B` is replaced (by a tiny checkpoint switched with `install_code`, so it carries
our remote code like a switched download); the blocks run in a fresh interpreter, offline, in a folder where
`cat.png` exists (README examples read their image from there).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dimple.remote_code import install_code
from dimple.tiny.bundled import BUNDLED_CHECKPOINT

README = Path(__file__).resolve().parents[1] / "README.md"
MODEL_ID = "rp-yu/Dimple-7B"

RUNNER = """
import sys, traceback
blocks = {blocks!r}
namespace = {{"__name__": "__main__"}}
for number, (line, source) in enumerate(blocks, start=1):
    try:
        exec(compile(source, f"README.md:{{line}}", "exec"), namespace)
    except BaseException:
        sys.stderr.write(f"README block {{number}} (line {{line}}) failed:\\n{{source}}\\n")
        traceback.print_exc()
        sys.exit(1)
    sys.stderr.write(f"README block {{number}} ok\\n")
"""


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, source) of every ```python fenced block."""
    return [
        (text.count("\n", 0, match.start()) + 2, match.group(1))
        for match in re.finditer(r"^```python[ \t]*\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    ]


def test_every_python_block_of_the_readme_runs(tmp_path):
    text = README.read_text(encoding="utf-8")
    blocks = python_blocks(text)
    assert blocks, "README.md has no python examples"
    assert any(MODEL_ID in source for _, source in blocks), "README examples no longer load the released model id"
    checkpoint = install_code(BUNDLED_CHECKPOINT, out=tmp_path / "Dimple-7B")[0].parent
    blocks = [(line, source.replace(MODEL_ID, str(checkpoint))) for line, source in blocks]
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(84, 112, 3), dtype=np.uint8)).save(tmp_path / "cat.png")

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, "-c", RUNNER.format(blocks=blocks)], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert result.stderr.count(" ok\n") == len(blocks)
