"""The bench_engine.py burst through `dimple serve`: two servers on 127.0.0.1 (the batching engine, and
`--no-batching`: generate() one request at a time), N concurrent HTTP clients sending one OpenAI chat completion each
(picture as a data URL + question). "answers equal solo" compares each batched answer with the one-at-a-time server's
answer to the same request. Used by `bench_engine.py --server`."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from bench_engine import client_chats, percentile


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def server(checkpoint: Path, *options: str, threads: int = 1) -> Iterator[str]:
    """`dimple serve` with `threads` torch threads on a free port until the block ends; yields its base URL once it
    answers."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
    log = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would stall the server's logging
    process = subprocess.Popen([sys.executable, "-m", "dimple", "serve", str(checkpoint), "--port", str(port),
                                "--served-model-name", "dimple", *options], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=5).read()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"dimple serve did not start: {log.read().decode()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


def request_body(chat: list[dict], settings: dict) -> bytes:
    """The chat as an OpenAI chat completion: the picture as a PNG data URL, then the question."""
    image, question = chat[0]["content"][0]["image"], chat[0]["content"][1]["text"]
    png = io.BytesIO()
    image.save(png, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": question}]
    dimple_settings = {key: value for key, value in settings.items() if key != "max_new_tokens"}
    return json.dumps({"model": "dimple", "messages": [{"role": "user", "content": content}],
                       "max_tokens": settings["max_new_tokens"], "generation_config": dimple_settings}).encode()


def ask(url: str, body: bytes) -> str:
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def burst(url: str, bodies: list[bytes], concurrent: bool) -> dict:
    """All bodies at once from one thread each, or one after another; latency counts from the burst's start."""
    start, answers, latencies = time.perf_counter(), [None] * len(bodies), [0.0] * len(bodies)

    def client(index: int) -> None:
        answers[index] = ask(url, bodies[index])
        latencies[index] = time.perf_counter() - start

    if concurrent:
        threads = [threading.Thread(target=client, args=(index,)) for index in range(len(bodies))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    else:
        for index in range(len(bodies)):
            client(index)
    return dict(wall=max(latencies), latencies=latencies, answers=answers)


def summary(clients: int, mode: str, runs: list[dict], answer_slots: int, solo: list[str],
            baseline: float | None) -> dict:
    run = sorted(runs, key=lambda run: run["wall"])[len(runs) // 2]
    return dict(clients=clients, mode=mode, wall=run["wall"], requests_s=clients / run["wall"],
                tokens_s=clients * answer_slots / run["wall"], p50_ms=percentile(run["latencies"], 0.5) * 1e3,
                p95_ms=percentile(run["latencies"], 0.95) * 1e3,
                speedup=None if baseline is None else baseline / run["wall"],
                equal=sum(answer == alone for answer, alone in zip(run["answers"], solo)))


def measure_server(checkpoint: Path, processor: Any, clients: list[int], settings: dict, repeats: int,
                   threads: int) -> list[dict]:
    """Per client count: the one-at-a-time server, then the batching one (max batch = the most clients)."""
    chats = client_chats(max(clients))
    bodies = [request_body(chat, settings) for chat in chats]
    slots, rows = settings["max_new_tokens"], []
    with server(checkpoint, "--no-batching", threads=threads) as sequential_url, \
            server(checkpoint, "--max-batch-size", str(max(clients)), threads=threads) as batching_url:
        ask(sequential_url, bodies[0]), ask(batching_url, bodies[0])  # warm both
        for count in clients:
            sequential, batched = [], []
            for _ in range(repeats):  # interleaved, so a slow spell of a shared machine hits both modes alike
                sequential.append(burst(sequential_url, bodies[:count], concurrent=True))
                batched.append(burst(batching_url, bodies[:count], concurrent=True))
            solo = sequential[0]["answers"]
            base = summary(count, "server, --no-batching (one at a time)", sequential, slots, solo, None)
            rows += [base, summary(count, f"server, engine max batch {max(clients)}", batched, slots, solo,
                                   base["wall"])]
    return rows
