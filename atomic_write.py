"""Writing user files so that they are never half-written.

Every file is written to a temporary file in the same folder, flushed and fsync'ed, then moved over the target with
`os.replace` (atomic on POSIX and Windows for one file system): a full disk, a write error or a kill leaves either the
old file or the new one, never an empty or truncated one. A symlink at the target is replaced, never written
through, so Hub-cache blobs stay intact. The folder is fsync'ed after the move so the rename itself survives a crash.
"""

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_folder(folder: Path) -> None:
    """Persist a folder's entries (a rename is only durable once its folder is synced); a no-op where folders
    cannot be opened (Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def stage(path: Path, data: bytes) -> Path:
    """Write `data` to a new, synced temporary file next to `path` and return it; nothing is left on failure."""
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def write_atomically(path: str | os.PathLike, data: bytes | str) -> Path:
    """Replace `path` with `data` (text is written as UTF-8) in one step; returns the path."""
    path = Path(path)
    temporary = stage(path, data.encode("utf-8") if isinstance(data, str) else data)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """For writers that need a file name (e.g. Pillow): yields a temporary path next to `path`; when the block ends
    without an error the file is synced and moved over `path`, otherwise it is removed."""
    path = Path(path)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def publish_folder(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Fill `folder` through `write(staging)` (e.g. `save_pretrained`), which writes into a fresh folder beside it;
    then every file is synced and moved into `folder` with `os.replace`. A failure or kill while writing leaves
    `folder` as it was; each file it holds is always a complete old or new version."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        write(staging)
        files = sorted(path for path in staging.iterdir() if path.is_file())
        for path in files:
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
        for path in files:
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fsync_folder(folder)
    return folder
