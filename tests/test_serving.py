"""`dimple serve` end to end, with the clients users run.

One server on 127.0.0.1 and a free port, started with README's command, serves the bundled tiny checkpoint for the
whole module and is shut down at the end. The official `openai` client sends images, text-only chats, streamed
requests, Dimple settings through `generation_config`, and two requests at once; every answer must equal what
`model.generate` + post-processing gives in this process for the same prompt and settings, streamed or not.
`transformers chat` then talks to the same server with no extra flags. Bad requests, limits and the media policy are
in test_serving_limits.py.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from serving_clients import EXAMPLE, EXAMPLE_ANSWER, data_url, expected, image_chat, post, server_env, serving, user

from dimple import DimpleModel, DimpleProcessor
from dimple.tiny.bundled import BUNDLED_CHECKPOINT

pytest.importorskip("fastapi", reason="dimple serve needs pip install 'dimple-hf[serve]'")
pytest.importorskip("uvicorn", reason="dimple serve needs pip install 'dimple-hf[serve]'")
openai = pytest.importorskip("openai", reason="the client tests need pip install 'dimple-hf[serve]'")

REPO = Path(__file__).resolve().parents[1]
README_PORT = "8000"


def serving_blocks() -> list[str]:
    """The ```bash blocks of README's Serving section: [install + server command, client + chat commands]."""
    section = (REPO / "README.md").read_text().split("## Serving", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```bash\n")[1:]]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """README's `dimple serve --host 127.0.0.1 --port 8000` (the bundled checkpoint), on a free port."""
    command = shlex.split(serving_blocks()[0].splitlines()[1])
    assert command[:2] == ["dimple", "serve"] and command[2:] == ["--host", "127.0.0.1", "--port", README_PORT]
    with serving([], tmp_path_factory.mktemp("serve-home")) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    """The name the server was started with (no model named: the bundled checkpoint's path), alone in /v1/models."""
    name = str(BUNDLED_CHECKPOINT)
    assert [model.id for model in client.models.list().data] == [name]
    return name


@pytest.fixture(scope="module")
def local():
    model = DimpleModel.from_pretrained(BUNDLED_CHECKPOINT).eval()
    return model, DimpleProcessor.from_pretrained(BUNDLED_CHECKPOINT)


def ask(client, model_id: str, content, **options):
    return client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": content}], **options)


def test_image_as_data_url_is_answered_with_the_checkpoint_canvas(client, model_id, local):
    reply = ask(client, model_id, image_chat(data_url()))
    answer, length, _ = expected(local, image_chat(data_url()))
    assert answer == EXAMPLE_ANSWER
    assert reply.choices[0].message.content == answer
    # The canvas ended with <|endoftext|>: a stop, and only the answer's tokens are counted.
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == length


def test_max_tokens_and_max_completion_tokens_set_the_canvas(client, model_id, local):
    answer = expected(local, image_chat(data_url()), max_new_tokens=5)[0]
    assert answer != EXAMPLE_ANSWER  # 5 slots change the answer, so the length reaching generate is visible
    for field in ("max_tokens", "max_completion_tokens"):
        assert ask(client, model_id, image_chat(data_url()), **{field: 5}).choices[0].message.content == answer


@pytest.mark.parametrize("url", [str(EXAMPLE), EXAMPLE.as_uri(), "/nonexistent/picture.png"])
def test_server_files_are_refused_by_default_without_touching_the_disk(client, model_id, server, url):
    """No --allowed-local-media-path: a path or file:// URL is refused with the same message whether or not the
    file exists (its existence does not leak), naming the operator's flag; the server answers on."""
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, model_id, image_chat(url))
    assert "Server-local pictures (paths and file:// URLs) are refused" in refused.value.message
    assert "--allowed-local-media-path" in refused.value.message
    assert refused.value.body["param"] == "messages[0].content[0]"
    assert ask(client, model_id, image_chat(data_url())).choices[0].message.content == EXAMPLE_ANSWER


def test_leftover_canvas_text_after_end_of_text_is_not_answered(client, model_id, local):
    """Issue 25.1: for this text-only prompt and 8 slots the canvas holds text after its first <|endoftext|>; the
    non-streamed reply, the streamed reply and generate() + post-processing all end at that end-of-text."""
    prompt = "What is in the picture?"
    answer, length, canvas = expected(local, prompt, max_new_tokens=8)
    eos = local[0].generation_config.eos_token_id
    assert length < 8 and bool((canvas[length + 1 :] != eos).any()), "the canvas must hold leftovers to test this"
    reply = ask(client, model_id, prompt, max_tokens=8)
    assert reply.choices[0].message.content == answer
    assert (reply.usage.completion_tokens, reply.choices[0].finish_reason) == (length, "stop")
    chunks = list(ask(client, model_id, prompt, max_tokens=8, stream=True))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == answer


def test_text_only_chat_uses_the_generation_config_canvas_not_1024(client, model_id, local):
    # The tiny model was trained on pictures only: text alone never reaches <|endoftext|>, so the answer fills the
    # whole canvas and its length is the canvas the server chose: generation_config.json's max_new_tokens.
    canvas = local[0].generation_config.max_new_tokens
    reply = ask(client, model_id, "Hello")
    answer, length, _ = expected(local, "Hello", max_new_tokens=canvas)
    assert length == canvas
    assert reply.choices[0].message.content == answer
    assert reply.usage.completion_tokens == canvas and reply.choices[0].finish_reason == "length"


def test_streaming_sends_the_final_answer_and_usage_when_asked(client, model_id, local):
    chunks = list(ask(client, model_id, image_chat(data_url()), stream=True, stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == EXAMPLE_ANSWER
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    length = expected(local, image_chat(data_url()))[1]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == chunks[-2].usage.completion_tokens == length


def test_dimple_settings_pass_through_generation_config(client, model_id, local):
    settings = {"max_new_tokens": 2, "steps": 1, "alg_p_threshold": 0.0}
    reply = ask(client, model_id, image_chat(data_url()), extra_body={"generation_config": json.dumps(settings)})
    answer = expected(local, image_chat(data_url()), **settings)[0]
    assert answer != EXAMPLE_ANSWER  # the settings change the answer, so passing them through is visible
    assert reply.choices[0].message.content == answer


def test_the_readme_client_block_gets_the_answer(server):
    block = serving_blocks()[1]
    script = block[block.index("python - <<'EOF'") : block.index("\nEOF\n") + len("\nEOF\n")]
    result = subprocess.run(
        ["bash", "-c", script.replace(README_PORT, str(server.port))], capture_output=True, text=True, timeout=600,
        env=server_env(server.home), cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [EXAMPLE_ANSWER, EXAMPLE_ANSWER]


def solo_answer(local, content, settings: dict, seed: int | None = None) -> str:
    if seed is not None:
        torch.manual_seed(seed)
    return expected(local, content, **settings)[0]


def test_concurrent_clients_are_batched_and_get_their_solo_answers(client, model_id, local, server):
    """Five clients at once (pictures, text, other lengths and settings, a seeded sampled answer, one streamed) go
    through the batching engine together; each gets what generate() gives its request alone."""
    assert "decoding concurrent requests together (batching engine" in server.log()
    requests = [
        (image_chat(data_url()), {}, {}),
        ("Hello", {"max_tokens": 6}, {"max_new_tokens": 6}),
        (image_chat(data_url()), {"extra_body": {"generation_config": json.dumps({"steps": 3, "alg": "entropy"})}},
         {"steps": 3, "alg": "entropy"}),
        ("What is in the picture?", {"max_tokens": 9, "temperature": 0.8, "seed": 7},
         {"max_new_tokens": 9, "temperature": 0.8}),
        (image_chat(data_url()), {"stream": True}, {}),
    ]
    solo = [solo_answer(local, content, settings, options.get("seed")) for content, options, settings in requests]

    def answer(request) -> str:
        reply = ask(client, model_id, request[0], **request[1])
        if request[1].get("stream"):
            return "".join(chunk.choices[0].delta.content or "" for chunk in reply if chunk.choices)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        assert list(pool.map(answer, requests)) == solo


# One chat session: a sampled turn (chat's default), then, with the history cleared, a greedy one. The text-only
# greedy answer of the tiny model fills its canvas (finish_reason "length"), so chat asks "Continue generating?" and
# the "n" after it answers; a sampled answer may end early instead, and then its "n" is one more (sampled) turn.
SAMPLED_THEN_GREEDY_SESSION = "!set max_new_tokens=12\nHello\nn\n!clear\n!set do_sample=False\nHello\nn\n!exit\n"


def test_transformers_chat_talks_to_the_server_without_extra_flags(server):
    """README's `transformers chat MODEL URL`, as a user types it. chat puts `do_sample=True` without a temperature
    in every request's generation_config, so Dimple samples (at transformers' default temperature 1) and the first
    reply is random, possibly empty (end-of-text sampled first): the check is that the turn completes. Then `!clear`
    and `!set do_sample=False` make the second reply greedy, which must hold text. Both with a 12-token answer set by
    chat's own `!set` (its default, 256, is a 256-step decode: minutes on a busy 2-core CPU)."""
    chat = next(line for line in serving_blocks()[1].splitlines() if line.startswith("transformers chat"))
    # chat's Hub client refuses every URL in offline mode, so this process is online-capable but only ever talks
    # to the loopback server: no update check, no telemetry. The `transformers` command of this interpreter.
    env = {key: value for key, value in server_env(server.home).items() if key != "HF_HUB_OFFLINE"}
    env.update(HF_HUB_DISABLE_UPDATE_CHECK="1", HF_HUB_DISABLE_TELEMETRY="1", COLUMNS="2000")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        ["bash", "-c", chat.replace(README_PORT, str(server.port))], input=SAMPLED_THEN_GREEDY_SESSION,
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "rror" not in result.stdout, result.stdout[-2000:]
    # Each model turn: its name tag, the reply on the next line, then chat's statistics line.
    lines = [line.strip() for line in result.stdout.splitlines()]
    tags = [index for index, line in enumerate(lines) if line == f"<{BUNDLED_CHECKPOINT}>:"]
    assert 2 <= len(tags) <= 3, lines
    for tag in tags:
        assert re.fullmatch(r"\d+ tokens in [\d.]+s \([\d.]+ tok/s\)", lines[tag + 2]), lines[tag:]
    assert lines[tags[-1] + 1], lines[tags[-1]:]


def test_a_switched_checkpoint_folder_is_served(tmp_path):
    """A folder switched with `dimple install-code` (remote code + auto_map, like a switched Dimple-7B download),
    named first as in `dimple serve Dimple-7B --port ...`: its answer is the bundled model's."""
    from dimple.remote_code import install_code

    folder = install_code(BUNDLED_CHECKPOINT, out=tmp_path / "Dimple-7B")[0].parent
    with serving([str(folder)], tmp_path) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", timeout=300, max_retries=0)
        reply = ask(client, str(folder), image_chat(data_url()))
        assert reply.choices[0].message.content == EXAMPLE_ANSWER
        status, body = post(server.url, {"model": str(BUNDLED_CHECKPOINT), "messages": user("Hi")})
        assert status == 404 and body["error"]["code"] == "model_not_found" and str(folder) in body["error"]["message"]
