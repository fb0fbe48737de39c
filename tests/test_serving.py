"""`dimple serve` (transformers' own server, told about Dimple) end to end, with the clients users run.

One server on 127.0.0.1 and a free port serves the bundled tiny checkpoint for the whole module and is shut down at
the end. The official `openai` client sends images (data URL and local path), text-only chats, streamed requests,
Dimple settings through `generation_config`, and two requests at once; every answer must equal what
`model.generate` gives in this process for the same prompt and settings. `transformers chat` then talks to the same
server with no extra flags.
"""

import base64
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

from dimple import DimpleModel, DimpleProcessor
from dimple.sampling_dimple import answer_lengths
from dimple.tiny.bundled import BUNDLED_CHECKPOINT

pytest.importorskip("fastapi", reason="transformers serve needs pip install 'dimple-hf[serve]'")
pytest.importorskip("uvicorn", reason="transformers serve needs pip install 'dimple-hf[serve]'")
openai = pytest.importorskip("openai", reason="the client tests need pip install 'dimple-hf[serve]'")

EXAMPLE = BUNDLED_CHECKPOINT / "example.png"
QUESTION = "Describe the image."
STARTUP_SECONDS = 240
REPO = Path(__file__).resolve().parents[1]
README_PORT = "8000"


def serving_blocks() -> list[str]:
    """The ```bash blocks of README's Serving section: [install + server command, client + chat commands]."""
    section = (REPO / "README.md").read_text().split("## Serving", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```bash\n")[1:]]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_env(home: Path) -> dict[str, str]:
    """Offline, a private HF cache (serve lists cached models), one thread per process: the server and this test
    process share the CPU, and oversubscribed torch threads slow small models down many times."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "OMP_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(home), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


@contextmanager
def serving(command: list[str], home: Path, port: int) -> Iterator[str]:
    """`python -m dimple serve ...` (`command` from `serve` on, listening on `port`) run in `home` with its log
    there; yields the server's URL once /health answers, and stops the server when the block ends."""
    url = f"http://127.0.0.1:{port}"
    with open(home / "server.log", "w+") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dimple", *command],
            cwd=home, env=server_env(home), stdout=log, stderr=subprocess.STDOUT, text=True,
        )
        try:
            wait_until_healthy(process, url, log)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python -m dimple serve --host 127.0.0.1 --port PORT` (the bundled checkpoint), up until the module ends."""
    home = tmp_path_factory.mktemp("serve-home")
    port = free_port()
    # README's command (`dimple serve --host 127.0.0.1 --port 8000`), on a free port, with this interpreter.
    command = shlex.split(serving_blocks()[0].splitlines()[1].replace(README_PORT, str(port)))
    assert command[:2] == ["dimple", "serve"], command
    with serving(command[1:], home, port) as url:
        yield {"url": url, "home": home, "port": str(port)}


def wait_until_healthy(process: subprocess.Popen, url: str, log) -> None:
    """Poll /health (serve loads the model before it listens); fail with the server's log if it dies or stalls."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        if process.poll() is not None:
            log.seek(0)
            pytest.fail(f"dimple serve exited with {process.returncode}:\n{log.read()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"dimple serve did not answer /health within {STARTUP_SECONDS} s")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key="not-needed", timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    """The name the server was started with (`dimple serve` with no model: the bundled checkpoint's path).
    Servers whose model manager has `list_models` (5.24) list exactly it in /v1/models; older ones (5.12) list only
    models of the Hub cache there."""
    from transformers.cli.serving.model_manager import ModelManager

    name = str(BUNDLED_CHECKPOINT)
    if hasattr(ModelManager, "list_models"):
        assert [model.id for model in client.models.list().data] == [name]
    return name


@pytest.fixture(scope="module")
def local():
    model = DimpleModel.from_pretrained(BUNDLED_CHECKPOINT).eval()
    return model, DimpleProcessor.from_pretrained(BUNDLED_CHECKPOINT)


def expected(local, content: list[dict] | str, **settings) -> tuple[str, int]:
    """The answer `model.generate` gives here for one user turn, and its length in tokens up to end-of-text."""
    model, processor = local
    if isinstance(content, list):
        with Image.open(EXAMPLE) as picture:
            image = picture.convert("RGB")
        content = [{"type": "image", "image": image} if part["type"] == "image_url" else part for part in content]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )
    with torch.inference_mode():
        answer = model.generate(**inputs, **settings)[:, inputs["input_ids"].shape[1] :]
    config = model.generation_config
    length = int(answer_lengths(answer, [config.eos_token_id, config.pad_token_id])[0])
    return processor.post_process_image_text_to_text(answer)[0], length


def image_chat(url: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]


def data_url() -> str:
    return "data:image/png;base64," + base64.b64encode(EXAMPLE.read_bytes()).decode()


def ask(client, model_id: str, content, **options):
    return client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": content}], **options)


def test_image_as_data_url_is_answered_with_the_checkpoint_canvas(client, model_id, local):
    reply = ask(client, model_id, image_chat(data_url()))
    answer, length = expected(local, image_chat(data_url()))
    assert answer == "two blue circles"
    assert reply.choices[0].message.content == answer
    # The canvas ended with <|endoftext|>: a stop, and only the answer's tokens are counted.
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == length


def test_image_as_local_path_with_max_tokens(client, model_id, local):
    reply = ask(client, model_id, image_chat(str(EXAMPLE)), max_tokens=8)
    assert reply.choices[0].message.content == expected(local, image_chat(str(EXAMPLE)), max_new_tokens=8)[0]


def test_text_only_chat_uses_the_generation_config_canvas_not_1024(client, model_id, local):
    # The tiny model was trained on pictures only: text alone never reaches <|endoftext|>, so the answer fills the
    # whole canvas and its length is the canvas the server chose: generation_config.json's max_new_tokens.
    canvas = local[0].generation_config.max_new_tokens
    reply = ask(client, model_id, "Hello")
    answer, length = expected(local, "Hello", max_new_tokens=canvas)
    assert length == canvas
    assert reply.choices[0].message.content == answer
    assert reply.usage.completion_tokens == canvas and reply.choices[0].finish_reason == "length"


def test_streaming_sends_the_final_answer(client, model_id):
    chunks = list(ask(client, model_id, image_chat(data_url()), stream=True))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "two blue circles"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_dimple_settings_pass_through_generation_config(client, model_id, local):
    settings = {"max_new_tokens": 2, "steps": 1, "alg_p_threshold": 0.0}
    reply = ask(client, model_id, image_chat(data_url()), extra_body={"generation_config": json.dumps(settings)})
    answer, _ = expected(local, image_chat(data_url()), **settings)
    assert answer != "two blue circles"  # the settings change the answer, so passing them through is visible
    assert reply.choices[0].message.content == answer


def test_the_readme_client_block_gets_the_answer(server):
    block = serving_blocks()[1]
    script = block[block.index("python - <<'EOF'") : block.index("\nEOF\n") + len("\nEOF\n")]
    result = subprocess.run(
        ["bash", "-c", script.replace(README_PORT, server["port"])], capture_output=True, text=True, timeout=600,
        env=server_env(server["home"]), cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["two blue circles", "two blue circles"]


def test_two_clients_at_once_get_their_solo_answers(client, model_id, local):
    requests = [(image_chat(data_url()), {}), ("Hello", {"max_tokens": 6})]
    solo = [expected(local, content, **({"max_new_tokens": 6} if options else {}))[0] for content, options in requests]
    with ThreadPoolExecutor(max_workers=2) as pool:
        replies = list(pool.map(lambda request: ask(client, model_id, request[0], **request[1]), requests))
    assert [reply.choices[0].message.content for reply in replies] == solo


# One chat session: a sampled turn (chat's default), then, with the history cleared, a greedy one.
SAMPLED_THEN_GREEDY_SESSION = "!set max_new_tokens=12\nHello\n!clear\n!set do_sample=False\nHello\n!exit\n"


def test_transformers_chat_talks_to_the_server_without_extra_flags(server):
    """README's `transformers chat MODEL URL`, as a user types it. chat puts `do_sample=True` without a temperature
    in every request's generation_config, so Dimple samples (at transformers' default temperature 1) and the first
    reply is random, possibly empty (end-of-text sampled first): the check is that the turn completes. Then `!clear`
    and `!set do_sample=False` make the second reply greedy, which must hold text. Both with a 12-token answer set by
    chat's own `!set` (its default, 256, is a 256-step decode: minutes on a busy 2-core CPU)."""
    chat = next(line for line in serving_blocks()[1].splitlines() if line.startswith("transformers chat"))
    # chat's Hub client refuses every URL in offline mode, so this process is online-capable but only ever talks
    # to the loopback server: no update check, no telemetry. The `transformers` command of this interpreter.
    env = {key: value for key, value in server_env(server["home"]).items() if key != "HF_HUB_OFFLINE"}
    env.update(HF_HUB_DISABLE_UPDATE_CHECK="1", HF_HUB_DISABLE_TELEMETRY="1", COLUMNS="2000")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        ["bash", "-c", chat.replace(README_PORT, server["port"])], input=SAMPLED_THEN_GREEDY_SESSION,
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "rror" not in result.stdout, result.stdout[-2000:]
    # Each model turn: its name tag, the reply on the next line, then chat's statistics line.
    lines = [line.strip() for line in result.stdout.splitlines()]
    tags = [index for index, line in enumerate(lines) if line == f"<{BUNDLED_CHECKPOINT}>:"]
    assert len(tags) == 2, lines
    for tag in tags:
        assert re.fullmatch(r"\d+ tokens in [\d.]+s \([\d.]+ tok/s\)", lines[tag + 2]), lines[tag:]
    assert lines[tags[1] + 1], lines[tags[1]:]


def test_a_switched_checkpoint_folder_is_served(tmp_path):
    """A folder switched with `dimple install-code` (remote code + auto_map, like a switched Dimple-7B download),
    named first as in `dimple serve Dimple-7B --port ...`: its answer is the bundled model's."""
    from dimple.remote_code import install_code

    folder = install_code(BUNDLED_CHECKPOINT, out=tmp_path / "Dimple-7B")[0].parent
    port = free_port()
    with serving(["serve", str(folder), "--host", "127.0.0.1", "--port", str(port)], tmp_path, port) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", timeout=300, max_retries=0)
        reply = ask(client, str(folder), image_chat(data_url()))
        assert reply.choices[0].message.content == "two blue circles"
