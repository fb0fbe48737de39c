"""Switch a Dimple checkpoint folder (e.g. a download of `rp-yu/Dimple-7B`) to this implementation's remote code.

The released repo ships transformers-4.46 remote code that does not import on transformers 5.x. `install_code`
writes our modules (the ones the model, processor, tokenizer and image processor classes need, found by
following their relative imports, as `trust_remote_code` loading does) next to the weights and points every
`auto_map` at them, so `AutoModel.from_pretrained(folder, trust_remote_code=True)` runs this code. Every other
config field and the weight files stay as they are; with `out`, a new folder is made whose unchanged files are
symlinks to the snapshot's.

Nothing is ever half-written: every new file is first written and synced next to its target, and only when all of
them are on disk are they moved into place (`os.replace`); a new `out` folder is built under a temporary name and
renamed when complete. A failure before that point (full disk, permissions, a kill) leaves the snapshot as it was.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files

from .atomic_write import fsync_folder, stage
from .configuration_dimple import DimpleConfig
from .image_processing_dimple import DimpleImageProcessor
from .loading_dimple import PICKLE_WEIGHTS, SAFETENSORS_WEIGHTS
from .modeling_dimple import MODEL_AUTO_CLASSES, DimpleModel, auto_map_reference
from .processing_dimple import DimpleProcessor
from .tokenization_dimple import DimpleTokenizer

PACKAGE_DIR = Path(__file__).resolve().parent


class InstallError(ValueError):
    """A problem with the user's folders or file system (not a bug): the command line prints it as one line."""


def model_auto_map() -> dict[str, str]:
    """config.json entries: the config, and the model under every Auto class users and pipelines reach for."""
    model = auto_map_reference(DimpleModel)
    return {"AutoConfig": auto_map_reference(DimpleConfig), **{name: model for name in MODEL_AUTO_CLASSES}}


def code_files() -> list[Path]:
    """Our modules a `trust_remote_code` load needs: each entry class's file plus its relative imports."""
    entries = (DimpleConfig, DimpleModel, DimpleProcessor, DimpleImageProcessor, DimpleTokenizer)
    files: set[Path] = set()
    for cls in entries:
        entry = PACKAGE_DIR / f"{cls.__module__.rsplit('.', 1)[-1]}.py"
        files.add(entry)
        files.update(Path(name).resolve() for name in get_relative_import_files(str(entry)))
    return sorted(files)


def read_json_object(path: Path) -> dict:
    """A config file's JSON object; anything else (bad JSON, a list, bad encoding) is refused by name."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InstallError(f"{path} is not valid JSON ({error}); re-download the checkpoint.") from error
    if not isinstance(values, dict):
        raise InstallError(
            f"{path} holds a JSON {type(values).__name__}, not an object; re-download the checkpoint."
        )
    return values


def updated_configs(folder: Path) -> dict[str, dict]:
    """The config files of `folder` that name classes, with our auto_map entries merged in (others unchanged)."""
    processor, image_processor = auto_map_reference(DimpleProcessor), auto_map_reference(DimpleImageProcessor)
    updates = {
        "config.json": (model_auto_map(), None),
        "preprocessor_config.json": ({"AutoImageProcessor": image_processor, "AutoProcessor": processor}, None),
        "processor_config.json": ({"AutoProcessor": processor}, {"AutoImageProcessor": image_processor}),
        "tokenizer_config.json": (
            {"AutoTokenizer": [auto_map_reference(DimpleTokenizer), None], "AutoProcessor": processor}, None
        ),
    }
    configs = {}
    for name, (entries, nested_image_entries) in updates.items():
        path = folder / name
        if not path.is_file():
            continue
        values = read_json_object(path)
        values["auto_map"] = {**(values.get("auto_map") or {}), **entries}
        if nested_image_entries and isinstance(values.get("image_processor"), dict):
            nested = values["image_processor"]
            nested["auto_map"] = {**(nested.get("auto_map") or {}), **nested_image_entries}
        configs[name] = values
    return configs


def check_snapshot(folder: Path) -> None:
    """Refuse folders that are not Dimple checkpoints, naming what is missing."""
    if not folder.is_dir():
        raise InstallError(f"checkpoint folder not found: {folder}; download it first, e.g. `hf download "
                           "rp-yu/Dimple-7B --local-dir Dimple-7B`.")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InstallError(f"{folder} has no config.json; pass the folder that holds the checkpoint's files.")
    model_type = read_json_object(config_path).get("model_type")
    if model_type != DimpleConfig.model_type:
        raise InstallError(f"{folder} holds a {model_type!r} checkpoint, not a Dimple one (model_type 'dimple').")
    if not any(next(folder.glob(pattern), None) for pattern in SAFETENSORS_WEIGHTS + PICKLE_WEIGHTS):
        raise InstallError(f"{folder} has no weight files (*.safetensors or *.bin); the download is incomplete.")


def output_folder(snapshot: Path, out: str | os.PathLike) -> Path:
    """The resolved `--out` folder: new or empty, and outside the snapshot (inside, its symlinks would loop)."""
    target = Path(out).expanduser().resolve()
    if target.is_relative_to(snapshot):
        raise InstallError(
            f"output folder {target} is inside the checkpoint folder {snapshot}; choose a folder outside it."
        )
    if target.exists() and not target.is_dir():
        raise InstallError(f"output folder {target} is a file; choose a new folder.")
    if target.is_dir() and any(target.iterdir()):
        raise InstallError(f"output folder {target} exists and is not empty; choose a new folder.")
    return target


def new_files(configs: dict[str, dict]) -> dict[str, bytes]:
    """Name -> contents of every file the switch writes: our code files and the updated configs."""
    contents = {source.name: source.read_bytes() for source in code_files()}
    for name, values in configs.items():
        contents[name] = (json.dumps(values, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    return contents


def switch_in_place(folder: Path, contents: dict[str, bytes]) -> list[Path]:
    """Write every file next to its target first; only when all are synced, move them into place."""
    staged: list[tuple[Path, Path]] = []
    try:
        for name, data in contents.items():
            staged.append((stage(folder / name, data), folder / name))
    except BaseException:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        raise
    for temporary, target in staged:
        os.replace(temporary, target)
    fsync_folder(folder)
    return [target for _, target in staged]


def build_new_folder(snapshot: Path, target: Path, contents: dict[str, bytes]) -> list[Path]:
    """Build the new folder under a temporary name beside `target` (new files plus symlinks to the snapshot's
    other files), then rename it into place, so `target` is either absent/empty or complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        for entry in sorted(snapshot.iterdir()):
            if entry.name not in contents:
                (building / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
        for name, data in contents.items():
            os.replace(stage(building / name, data), building / name)
        fsync_folder(building)
        os.replace(building, target)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    fsync_folder(target.parent)
    return [target / name for name in contents]


def install_code(snapshot: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write our remote code and auto_map entries into `snapshot`, or into a new folder `out`.

    With `out`, every file of the snapshot that is not rewritten (weights, tokenizer files, ...) becomes a
    symlink to the original. Returns the files written. Every refusal and file-system error is an `InstallError`
    naming the path; on an error the snapshot is left as it was.
    """
    snapshot = Path(snapshot).expanduser().resolve()
    check_snapshot(snapshot)
    target = None if out is None or Path(out).expanduser().resolve() == snapshot else output_folder(snapshot, out)
    try:
        contents = new_files(updated_configs(snapshot))
        if target is None:
            return switch_in_place(snapshot, contents)
        return build_new_folder(snapshot, target, contents)
    except OSError as error:
        where = error.filename or target or snapshot
        raise InstallError(
            f"cannot write {where}: {error.strerror or error}; nothing was switched (check free space and "
            "permissions), then run the command again."
        ) from error
