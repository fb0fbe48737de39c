"""`dimple install-code`: a folder laid out like the released `rp-yu/Dimple-7B` repo runs our code afterwards.

The released repo holds transformers-4.46 remote code that fails to import on 5.x; here it is simulated by
modules that raise on import. After the command, a fresh interpreter in which `dimple` cannot be imported loads
the folder through the Auto classes and gets our classes from the folder, with the same logits as in-process.
"""

import hashlib
import json
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from cli_errors import user_error_line
from isolated import run_without_dimple
from prompts import picture

from dimple.remote_code import code_files, install_code
from dimple.tiny.build import build_tiny_model, build_tiny_processor

REPO_ROOT = Path(__file__).resolve().parents[1]
RELEASED_CODE = (
    "configuration_dimple.py", "modeling_dimple.py", "generation_utils.py", "processing_dimple.py",
    "image_processing_dimple.py", "tokenization_dimple.py",
)
OLD_CODE = 'raise ImportError("transformers 4.46 remote code: VideoInput moved to transformers.video_utils")\n'


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def released_config(saved: dict) -> dict:
    """The flat 4.46 config.json of the released repo, with its two auto_map entries, for a saved tiny config."""
    config = {key: value for key, value in saved.items() if key not in ("dtype", "auto_map", "vision_config")}
    vision_keys = ("depth", "fullatt_block_indexes", "hidden_size", "intermediate_size", "num_heads",
                   "out_hidden_size", "window_size")
    config["vision_config"] = {key: saved["vision_config"][key] for key in vision_keys} | {"model_type": "dimple"}
    config.update(
        torch_dtype="float32",
        transformers_version="4.46.2",
        auto_map={"AutoConfig": "configuration_dimple.DimpleConfig", "AutoModel": "modeling_dimple.DimpleModel"},
    )
    return config


@pytest.fixture
def released_repo(tmp_path, released_layout_dir):
    """A released-layout folder: tiny weights, flat config, 4.46 processor files, broken old code.

    config.json and modeling_dimple.py are symlinks into a `blobs/` folder, as in a Hub cache snapshot.
    """
    processor = build_tiny_processor()
    model = build_tiny_model(processor)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    folder = released_layout_dir(min_pixels=processor.image_processor.size["shortest_edge"],
                                 max_pixels=processor.image_processor.size["longest_edge"])
    (folder / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    (folder / "generation_config.json").write_text((saved / "generation_config.json").read_text())
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    config_text = json.dumps(released_config(json.loads((saved / "config.json").read_text())), indent=2)
    (blobs / "config-blob").write_text(config_text)
    (folder / "config.json").symlink_to(blobs / "config-blob")
    for name in RELEASED_CODE:
        (folder / name).unlink(missing_ok=True)
        (folder / name).write_text(OLD_CODE)
    (folder / "modeling_dimple.py").unlink()
    (blobs / "modeling-blob").write_text(OLD_CODE)
    (folder / "modeling_dimple.py").symlink_to(blobs / "modeling-blob")
    return folder, model


def load_script(folders: list[Path], inputs_path: Path) -> str:
    return textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
        inputs = torch.load({str(inputs_path)!r})
        for folder in {[str(folder) for folder in folders]!r}:
            model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
            for auto_class in (AutoModelForImageTextToText, AutoModelForCausalLM):
                assert type(auto_class.from_pretrained(folder, trust_remote_code=True)) is type(model)
            processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
            for obj in (model, processor, processor.tokenizer, processor.image_processor):
                assert type(obj).__module__.startswith("transformers_modules."), type(obj).__module__
            assert type(model).__name__ == "DimpleModel" and type(processor).__name__ == "DimpleProcessor"
            with torch.no_grad():
                logits = model(**inputs).logits
                out = model.generate(**inputs, max_new_tokens=4)
            assert out.shape[1] == inputs["input_ids"].shape[1] + 4
            torch.save(logits, folder + "/logits.pt")
        assert "dimple" not in sys.modules
        print("loaded", {len(folders)})
        """
    )


def model_inputs(tmp_path: Path) -> Path:
    processor = build_tiny_processor()
    messages = [{"role": "user", "content": [{"type": "image", "image": picture(64, 48)},
                                             {"type": "text", "text": "What is shown in this picture?"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    path = tmp_path / "inputs.pt"
    torch.save(dict(inputs), path)
    return path


def test_install_code_in_place_and_into_a_new_folder(released_repo, tmp_path):
    folder, model = released_repo
    blobs = tmp_path / "blobs"
    before = {path.name: path.read_bytes() for path in folder.iterdir() if not path.is_symlink()}
    blob_bytes = {path.name: path.read_bytes() for path in blobs.iterdir()}
    weights_hash = sha256(folder / "model.safetensors")
    configs_before = {
        name: json.loads((folder / name).read_text())
        for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json")
    }

    # A new folder first (the snapshot must stay byte-identical), through the command line.
    new = tmp_path / "switched"
    result = subprocess.run(
        [sys.executable, "-m", "dimple", "install-code", str(folder), "--out", str(new)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trust_remote_code=True" in result.stdout
    assert {path.name: path.read_bytes() for path in folder.iterdir() if not path.is_symlink()} == before
    assert (folder / "modeling_dimple.py").read_text() == OLD_CODE
    assert (new / "model.safetensors").is_symlink()
    assert (new / "model.safetensors").resolve() == (folder / "model.safetensors").resolve()
    assert not (new / "config.json").is_symlink() and not (new / "modeling_dimple.py").is_symlink()

    # Then in place.
    written = install_code(folder)
    assert {path.name for path in written} >= set(RELEASED_CODE) | set(configs_before)
    assert {path.name: path.read_bytes() for path in blobs.iterdir()} == blob_bytes, "Hub cache blobs changed"
    assert sha256(folder / "model.safetensors") == weights_hash
    for target in (folder, new):
        for source in code_files():
            assert (target / source.name).read_text() == source.read_text()
        for name, old in configs_before.items():
            updated = json.loads((target / name).read_text())
            assert {k: v for k, v in updated.items() if k != "auto_map"} == {
                k: v for k, v in old.items() if k != "auto_map"
            }, name
        auto_map = json.loads((target / "config.json").read_text())["auto_map"]
        assert auto_map == {
            "AutoConfig": "configuration_dimple.DimpleConfig",
            "AutoModel": "modeling_dimple.DimpleModel",
            "AutoModelForImageTextToText": "modeling_dimple.DimpleModel",
            "AutoModelForCausalLM": "modeling_dimple.DimpleModel",
        }
        tokenizer_map = json.loads((target / "tokenizer_config.json").read_text())["auto_map"]
        assert tokenizer_map["AutoTokenizer"] == ["tokenization_dimple.DimpleTokenizer", None]

    inputs_path = model_inputs(tmp_path)
    workdir = tmp_path / "fresh"
    workdir.mkdir()
    result = run_without_dimple(load_script([folder, new], inputs_path), workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("loaded 2")
    with torch.no_grad():
        expected = model(**torch.load(inputs_path)).logits
    for target in (folder, new):
        torch.testing.assert_close(torch.load(target / "logits.pt"), expected, atol=1e-5, rtol=0)


def test_the_switched_folder_would_fail_without_the_command(released_repo, tmp_path):
    """Guards the test above: the simulated released code really is what a 5.x user would get."""
    folder, _ = released_repo
    workdir = tmp_path / "fresh"
    workdir.mkdir()
    script = f"from transformers import AutoModel\nAutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
    result = run_without_dimple(script, workdir)
    assert result.returncode != 0 and "transformers 4.46 remote code" in result.stderr


USER_ERRORS = {
    "missing": "checkpoint folder not found",
    "not_dimple": "not a Dimple one",
    "no_weights": "has no weight files",
    "out_not_empty": "exists and is not empty",
    "config_is_a_list": "config.json holds a JSON list, not an object",
    "tokenizer_config_is_a_list": "tokenizer_config.json holds a JSON list, not an object",
    "out_is_a_file": "is a file; choose a new folder",
    "out_inside_the_snapshot": "is inside the checkpoint folder",
}


def user_error_folder(tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    """A checkpoint folder (and --out arguments) that the command must refuse for `case`."""
    folder = tmp_path / "checkpoint"
    out_args: list[str] = []
    if case != "missing":
        folder.mkdir()
        model_type = "llama" if case == "not_dimple" else "dimple"
        config = [{"model_type": model_type}] if case == "config_is_a_list" else {"model_type": model_type}
        (folder / "config.json").write_text(json.dumps(config))
        if case != "no_weights":
            (folder / "model.safetensors").write_bytes(b"weights")
    if case == "tokenizer_config_is_a_list":
        (folder / "tokenizer_config.json").write_text("[]")
    if case == "out_not_empty":
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "file.txt").write_text("x")
        out_args = ["--out", str(tmp_path / "busy")]
    if case == "out_is_a_file":
        (tmp_path / "a_file").write_text("x")
        out_args = ["--out", str(tmp_path / "a_file")]
    if case == "out_inside_the_snapshot":
        out_args = ["--out", str(folder / "sub")]
    return folder, out_args


def test_install_code_user_errors(tmp_path):
    """Each refusal is one line with exit code 2, and nothing in the folder changed (no symlink loop either)."""
    running = []
    for case, message in USER_ERRORS.items():
        case_path = tmp_path / case
        case_path.mkdir()
        folder, out_args = user_error_folder(case_path, case)
        before = snapshot_state(folder) if folder.exists() else {}
        process = subprocess.Popen(
            [sys.executable, "-m", "dimple", "install-code", str(folder), *out_args],
            cwd=case_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        running.append((case, message, folder, before, process))
    for case, message, folder, before, process in running:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, (case, stderr[-2000:])
        assert message in user_error_line(stderr), case
        assert (snapshot_state(folder) if folder.exists() else {}) == before, case


def snapshot_state(folder: Path) -> dict[str, tuple[bool, bytes | str]]:
    """Every entry of a folder: whether it is a symlink, and its target or bytes."""
    return {
        path.name: (True, str(path.readlink())) if path.is_symlink() else (False, path.read_bytes())
        for path in sorted(folder.iterdir())
        if path.is_symlink() or path.is_file()
    }


def limit_file_size(limit: int):
    """A preexec_fn: writes beyond `limit` bytes fail with EFBIG (Python ignores SIGXFSZ), like a full disk."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("into_new_folder", [False, True])
def test_a_failing_write_leaves_the_snapshot_as_it_was(released_repo, tmp_path, into_new_folder):
    folder, _ = released_repo
    blobs = tmp_path / "blobs"
    before, blob_bytes = snapshot_state(folder), snapshot_state(blobs)
    out_args = ["--out", str(tmp_path / "switched")] if into_new_folder else []
    result = subprocess.run(
        [sys.executable, "-m", "dimple", "install-code", str(folder), *out_args],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size(4096),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "cannot write" in user_error_line(result.stderr) and "File too large" in result.stderr
    assert snapshot_state(folder) == before and snapshot_state(blobs) == blob_bytes
    assert not (tmp_path / "switched").exists()
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".switched")]


KILL_AT_EVERY_STEP = textwrap.dedent(
    """
    import os, shutil, signal, sys
    from pathlib import Path
    from dimple.remote_code import install_code

    template, work = Path(sys.argv[1]), Path(sys.argv[2])
    CHANGES = {"os.rename", "os.remove", "os.symlink", "os.truncate", "os.mkdir", "shutil.copyfile"}
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC

    def changes_files(event, args):
        if event == "open":
            mode, flags = args[1], args[2]
            return (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
        return event in CHANGES

    def killer(stop_at):
        seen = [0]
        def hook(event, args):
            if changes_files(event, args):
                seen[0] += 1
                if seen[0] == stop_at:
                    os.kill(os.getpid(), signal.SIGKILL)
        return hook

    for stop_at in range(1, 400):
        folder = work / f"kill-{stop_at}"
        shutil.copytree(template, folder, symlinks=True)
        child = os.fork()
        if child == 0:
            sys.addaudithook(killer(stop_at))
            install_code(folder)
            os._exit(0)
        _, status = os.waitpid(child, 0)
        if os.WIFEXITED(status):
            print("completed", stop_at)
            break
        print("killed", stop_at, flush=True)
    """
)


def test_kill_at_any_moment_never_leaves_a_broken_file(released_repo, tmp_path):
    """kill -9 before each file-system change of `install-code` in turn: every JSON file is present and parses,
    and every code file is whole (the old or the new version), never empty or cut."""
    folder, _ = released_repo
    new_code = {source.name: source.read_bytes() for source in code_files()}
    before = {path.name: path.read_bytes() for path in folder.iterdir() if path.suffix in (".json", ".py")}
    work = tmp_path / "runs"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", KILL_AT_EVERY_STEP, str(folder), str(work)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    killed = [line for line in result.stdout.splitlines() if line.startswith("killed")]
    assert len(killed) > 10 and result.stdout.splitlines()[-1].startswith("completed")
    for run in sorted(work.iterdir()):
        for name, old in before.items():
            path = run / name
            assert path.is_file(), f"{name} missing after {run.name}"
            data = path.read_bytes()
            if name.endswith(".json"):
                assert isinstance(json.loads(data), dict), f"{name} broken after {run.name}"
            else:
                assert data in (old, new_code.get(name)), f"{name} cut after {run.name}"
