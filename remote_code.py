"""Switch a Dimple checkpoint folder (e.g. a download of `rp-yu/Dimple-7B`) to this implementation's remote code.

The released repo ships transformers-4.46 remote code that does not import on transformers 5.x. `install_code`
writes our modules (the ones the model, processor, tokenizer and image processor classes need, found by
following their relative imports, as `trust_remote_code` loading does) next to the weights and points every
`auto_map` at them, so `AutoModel.from_pretrained(folder, trust_remote_code=True)` runs this code. Every other
config field and the weight files stay as they are; with `out`, a new folder is made whose unchanged files are
symlinks to the snapshot's.
"""

import json
import shutil
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files

from .configuration_dimple import DimpleConfig
from .image_processing_dimple import DimpleImageProcessor
from .modeling_dimple import DimpleModel
from .processing_dimple import DimpleProcessor
from .tokenization_dimple import DimpleTokenizer

PACKAGE_DIR = Path(__file__).resolve().parent
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")


def reference(cls: type) -> str:
    """`module.Class` as an auto_map names a class of a flat remote-code folder."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def model_auto_map() -> dict[str, str]:
    """config.json entries: the config, and the model under every Auto class users and pipelines reach for."""
    model = reference(DimpleModel)
    return {
        "AutoConfig": reference(DimpleConfig),
        "AutoModel": model,
        "AutoModelForImageTextToText": model,
        "AutoModelForCausalLM": model,
    }


def code_files() -> list[Path]:
    """Our modules a `trust_remote_code` load needs: each entry class's file plus its relative imports."""
    entries = (DimpleConfig, DimpleModel, DimpleProcessor, DimpleImageProcessor, DimpleTokenizer)
    files: set[Path] = set()
    for cls in entries:
        entry = PACKAGE_DIR / f"{cls.__module__.rsplit('.', 1)[-1]}.py"
        files.add(entry)
        files.update(Path(name).resolve() for name in get_relative_import_files(str(entry)))
    return sorted(files)


def updated_configs(folder: Path) -> dict[str, dict]:
    """The config files of `folder` that name classes, with our auto_map entries merged in (others unchanged)."""
    processor, image_processor = reference(DimpleProcessor), reference(DimpleImageProcessor)
    updates = {
        "config.json": (model_auto_map(), None),
        "preprocessor_config.json": ({"AutoImageProcessor": image_processor, "AutoProcessor": processor}, None),
        "processor_config.json": ({"AutoProcessor": processor}, {"AutoImageProcessor": image_processor}),
        "tokenizer_config.json": (
            {"AutoTokenizer": [reference(DimpleTokenizer), None], "AutoProcessor": processor}, None
        ),
    }
    configs = {}
    for name, (entries, nested_image_entries) in updates.items():
        path = folder / name
        if not path.is_file():
            continue
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON ({error}); re-download the checkpoint.") from error
        values["auto_map"] = {**values.get("auto_map", {}), **entries}
        if nested_image_entries and isinstance(values.get("image_processor"), dict):
            nested = values["image_processor"]
            nested["auto_map"] = {**nested.get("auto_map", {}), **nested_image_entries}
        configs[name] = values
    return configs


def check_snapshot(folder: Path) -> None:
    """Refuse folders that are not Dimple checkpoints, naming what is missing."""
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder not found: {folder}; download it first, e.g. `hf download "
                         "rp-yu/Dimple-7B --local-dir Dimple-7B`.")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} has no config.json; pass the folder that holds the checkpoint's files.")
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON ({error}); re-download the checkpoint.") from error
    if model_type != DimpleConfig.model_type:
        raise ValueError(f"{folder} holds a {model_type!r} checkpoint, not a Dimple one (model_type 'dimple').")
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise ValueError(f"{folder} has no weight files (*.safetensors or *.bin); the download is incomplete.")


def write_file(path: Path, text: str) -> None:
    """Write a regular file, replacing a symlink rather than writing through it (Hub cache blobs stay intact)."""
    if path.is_symlink():
        path.unlink()
    path.write_text(text, encoding="utf-8")


def install_code(snapshot: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write our remote code and auto_map entries into `snapshot`, or into a new folder `out`.

    With `out`, every file of the snapshot that is not rewritten (weights, tokenizer files, ...) becomes a
    symlink to the original. Returns the files written.
    """
    snapshot = Path(snapshot).expanduser().resolve()
    check_snapshot(snapshot)
    target = snapshot
    configs = updated_configs(snapshot)
    code = code_files()
    if out is not None and Path(out).expanduser().resolve() != snapshot:
        target = Path(out).expanduser().resolve()
        if target.exists() and any(target.iterdir()):
            raise ValueError(f"output folder {target} exists and is not empty; choose a new folder.")
        target.mkdir(parents=True, exist_ok=True)
        rewritten = set(configs) | {path.name for path in code}
        for entry in sorted(snapshot.iterdir()):
            if entry.name not in rewritten:
                (target / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())

    written = []
    for source in code:
        destination = target / source.name
        if destination.is_symlink():
            destination.unlink()
        shutil.copyfile(source, destination)
        written.append(destination)
    for name, values in configs.items():
        write_file(target / name, json.dumps(values, indent=2, ensure_ascii=False) + "\n")
        written.append(target / name)
    return written
