"""The tiny checkpoint bundled with the package, and the one routine that writes any tiny checkpoint folder.

`BUNDLED_CHECKPOINT` (`tiny/checkpoint/`, the CLI's and the server's default model) is the trained tiny Dimple that
`python -m dimple.tiny train` makes. It is a complete checkpoint: it carries copies of the remote-code modules its
auto_maps name, so `trust_remote_code=True` loads it in an interpreter without the package. `python -m dimple.tiny
sync-code` refreshes those copies after the package's modules change; a test fails while they differ.
"""

from collections.abc import Callable
from pathlib import Path

from ..atomic_write import publish_folder, write_atomically
from ..modeling_dimple import DimpleModel
from ..processing_dimple import DimpleProcessor
from ..remote_code import code_files

BUNDLED_CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"


def stale_remote_code(folder: Path = BUNDLED_CHECKPOINT) -> list[str]:
    """Names of the remote-code files `folder` lacks, holds in another version than the package, or holds
    although no auto_map needs them."""
    folder = Path(folder)
    wanted = {path.name: path for path in code_files()}
    present = {path.name for path in folder.glob("*.py")}
    differing = [name for name, source in wanted.items() if name not in present or
                 (folder / name).read_bytes() != source.read_bytes()]
    return sorted(differing + list(present - set(wanted)))


def sync_remote_code(folder: Path = BUNDLED_CHECKPOINT) -> list[Path]:
    """Copy the package's remote-code modules into `folder` (and drop any others), so that it loads with
    `trust_remote_code=True` in an interpreter without the package."""
    folder = Path(folder)
    wanted = {path.name: path for path in code_files()}
    for path in folder.glob("*.py"):
        if path.name not in wanted:
            path.unlink()
    for name, source in wanted.items():
        write_atomically(folder / name, source.read_bytes())
    return [folder / name for name in sorted(wanted)]


def write_checkpoint(
    folder: str | Path,
    model: DimpleModel,
    processor: DimpleProcessor,
    with_code: bool,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save `model` and `processor` to `folder` as one checkpoint; `extra(staging)` may add files of its own.

    `save_pretrained` copies the modules of registered classes into the folder. With `with_code` the folder gets
    exactly the remote-code modules its auto_maps name (it loads without the package); without, it keeps no Python
    file (importing dimple serves it, and copies would go stale). Everything is written beside `folder` first and
    moved in file by file, so an interrupted save leaves no half-written file.
    """

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if with_code:
            sync_remote_code(staging)
        else:
            for module in staging.glob("*.py"):
                module.unlink()
        if extra is not None:
            extra(staging)

    return publish_folder(folder, write)
