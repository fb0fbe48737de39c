"""Side by side: `generate()` wall time and tokens of two git revisions, on the bundled tiny checkpoint.

For refactors that must change neither tokens nor speed. Each revision is checked out into a temporary git worktree
and imported from there (`import dimple` resolves to that tree) in its own interpreter; the two run alternately,
`--rounds` times each, and the table reports the median over rounds of each round's median call time, the ratio
after/before, and whether every run of both revisions produced the same tokens. CPU times are for the ratio only.

    python benchmarks/compare_revisions.py BEFORE [AFTER] [--calls 15] [--rounds 3] [--threads 1] [--out FILE]
"""

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench_generate import append_to_results

REPO = Path(__file__).resolve().parents[1]
MODES = {"prefix cache": dict(use_cache=True), "no cache": dict(use_cache=False),
         "dual cache, block 4": dict(use_cache=True, block_length=4)}

# Run inside a fresh interpreter with the revision's tree first on sys.path; prints one JSON line.
TIMED_RUN = r"""
import json, sys, time
import torch
tree, calls, threads, modes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
sys.path.insert(0, tree)
torch.set_num_threads(threads)
from pathlib import Path
from PIL import Image
import dimple
from transformers import AutoModel, AutoProcessor
root = Path(dimple.__file__).parent
folder = root / "tiny" / "checkpoint" if (root / "tiny" / "checkpoint").is_dir() else root / "tiny_checkpoint"
model, processor = AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
text = processor.apply_chat_template(chat, add_generation_prompt=True)
inputs = processor(text=[text], images=[Image.open(folder / "example.png")], return_tensors="pt")
results = {}
for name, settings in modes.items():
    model.generate(**inputs, max_new_tokens=12, **settings)
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        tokens = model.generate(**inputs, max_new_tokens=12, **settings)
        seconds.append(time.perf_counter() - start)
    results[name] = [sorted(seconds)[len(seconds) // 2], tokens[0, -12:].tolist()]
print(json.dumps({"file": dimple.__file__, "results": results}))
"""


def timed_round(tree: Path, calls: int, threads: int) -> dict:
    """One interpreter's median seconds and tokens per mode, checking that it imported `tree`'s package."""
    command = [sys.executable, "-c", TIMED_RUN, str(tree), str(calls), str(threads), json.dumps(MODES)]
    output = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    if not Path(output["file"]).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"imported {output['file']} instead of the worktree {tree}")
    return output["results"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after", nargs="?", default="HEAD")
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"), help="results file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        trees = {}
        for label, revision in (("before", args.before), ("after", args.after)):
            trees[label] = Path(scratch, label)
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q",
                            str(trees[label] / "dimple"), revision], check=True)
        try:
            rounds = {label: [] for label in trees}
            for _ in range(args.rounds):
                for label, tree in trees.items():
                    rounds[label].append(timed_round(tree, args.calls, args.threads))
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree / "dimple")])
    rows = []
    for mode in MODES:
        before, after = (statistics.median(run[mode][0] for run in rounds[label]) for label in ("before", "after"))
        tokens = {tuple(run[mode][1]) for label in rounds for run in rounds[label]}
        rows.append(f"| {mode} | {before * 1e3:.1f} | {after * 1e3:.1f} | {after / before:.2f} | "
                    f"{'yes' if len(tokens) == 1 else 'NO'} |")
    machine = f"{platform.processor() or platform.machine()} CPU, {args.threads} thread(s)"
    table = (f"\n### {datetime.date.today()} — revisions {args.before} → {args.after}, {machine}, torch "
             f"{torch.__version__}; bundled tiny checkpoint, example picture, 12 answer slots, defaults; median of "
             f"{args.rounds} interleaved interpreters × median of {args.calls} calls\n\n"
             "| mode | before ms | after ms | after / before | same tokens |\n|---|---|---|---|---|\n"
             + "\n".join(rows) + "\n")
    print(table)
    append_to_results(args.out, table)


if __name__ == "__main__":
    main()
