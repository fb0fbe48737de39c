"""Print the lowest transformers release pyproject.toml allows, so CI tests the floor the package declares."""

import re
import sys
import tomllib
from pathlib import Path

dependencies = tomllib.loads(Path(__file__).parents[1].joinpath("pyproject.toml").read_text())["project"]["dependencies"]
requirement = next(dep for dep in dependencies if re.match(r"transformers\b", dep))
floor = re.search(r">=\s*([\w.]+)", requirement)
if floor is None:
    raise SystemExit(f"pyproject.toml's {requirement!r} names no lower bound (>=X) for CI to test.")
sys.stdout.write(floor.group(1) + "\n")
