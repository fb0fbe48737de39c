"""What the serving tests share: a `dimple serve` subprocess on 127.0.0.1 and a free port, raw HTTP, and the answer
`model.generate` + post-processing gives in the test's own process for the same chat."""

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

from dimple.sampling_dimple import answer_lengths
from dimple.tiny.bundled import BUNDLED_CHECKPOINT

EXAMPLE = BUNDLED_CHECKPOINT / "example.png"
QUESTION = "Describe the image."
EXAMPLE_ANSWER = "two blue circles"  # what the bundled model says about example.png (asserted against generate)
STARTUP_SECONDS = 300


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_env(home: Path) -> dict[str, str]:
    """Offline, a private HF cache, one thread per process: the server and this test process share the CPU, and
    oversubscribed torch threads slow small models down many times."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "OMP_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(home), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


class Server:
    """A running `python -m dimple serve ...`: its process, URL, port and log file."""

    def __init__(self, process: subprocess.Popen, url: str, port: int, log_path: Path, home: Path):
        self.process, self.url, self.port, self.log_path, self.home = process, url, port, log_path, home

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, seconds: float = 300, after: int = 0) -> str:
        """The log from `after` on, once it holds `text`; fails after `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            tail = self.log()[after:]
            if text in tail:
                return tail
            time.sleep(0.2)
        pytest.fail(f"the server log never said {text!r}:\n{self.log()[-3000:]}")


@contextmanager
def serving(arguments: list[str], home: Path) -> Iterator[Server]:
    """`python -m dimple serve ARGUMENTS --host 127.0.0.1 --port FREE` run in `home`; yields once /health answers,
    stops the server (SIGTERM, then SIGKILL after 30 s) when the block ends."""
    port = free_port()
    log_path = home / f"server-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dimple", "serve", *arguments, "--host", "127.0.0.1", "--port", str(port)],
            cwd=home, env=server_env(home), stdout=log, stderr=subprocess.STDOUT, text=True,
        )
    server = Server(process, f"http://127.0.0.1:{port}", port, log_path, home)
    try:
        wait_until_healthy(server)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_until_healthy(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        if server.process.poll() is not None:
            pytest.fail(f"dimple serve exited with {server.process.returncode}:\n{server.log()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"dimple serve did not answer /health within {STARTUP_SECONDS} s")
        time.sleep(0.5)


def post(url: str, body: dict | bytes | str, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    """Raw HTTP POST (JSON unless bytes/str are given as they are); returns the status and the JSON answer."""
    data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def data_url(path: Path = EXAMPLE, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def image_chat(url: str, text: str = QUESTION) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]


def user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


def local_inputs(processor, content: list[dict] | str, escape: bool = False) -> dict:
    """The processor inputs for one user turn, example.png standing for every image_url."""
    if isinstance(content, list):
        with Image.open(EXAMPLE) as picture:
            image = picture.convert("RGB")
        content = [{"type": "image", "image": image} if part["type"] == "image_url" else part for part in content]
    return processor.apply_chat_template(
        user(content), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        escape_special_tokens=escape,
    )


def expected(local, content: list[dict] | str, escape: bool = False, **settings) -> tuple[str, int, torch.Tensor]:
    """`model.generate` + `post_process_image_text_to_text` here: the answer text, its length up to end-of-text,
    and the whole answer canvas."""
    model, processor = local
    inputs = local_inputs(processor, content, escape)
    with torch.inference_mode():
        canvas = model.generate(**inputs, **settings)[:, inputs["input_ids"].shape[1] :]
    config = model.generation_config
    length = int(answer_lengths(canvas, [config.eos_token_id, config.pad_token_id])[0])
    return processor.post_process_image_text_to_text(canvas)[0], length, canvas[0]
