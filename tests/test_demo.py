"""`dimple demo` in a real browser: a picture drawn here is uploaded through headless Chromium, the canvas is seen
half-denoised before the answer arrives, and every answer equals `model.generate`'s for the same conversation and
settings (computed in this process on the same bundled checkpoint). Also: a changed setting, readable messages for
bad settings, the GIF/HTML export, clearing, and the settings, canvas and Space pieces without a browser.

The browser tests need gradio, selenium, and Debian's chromium + chromium-driver (`.ci/run` installs all of them);
they skip, naming what is missing, only where those cannot be found.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from dimple.cli import main as dimple_main
from dimple.demo.canvas import CanvasRecorder, canvas_html
from dimple.demo.settings import parse_settings
from dimple.demo.space import SPACE_REQUIREMENTS, write_space
from dimple.demo.turn import HOLD_AFTER_FIRST_STEP, Stopped, TurnResult, decode_turn, user_message
from dimple.engine import DiffusionEngine
from dimple.modeling_dimple import DimpleModel
from dimple.processing_dimple import DimpleProcessor
from dimple.tiny.bundled import BUNDLED_CHECKPOINT

REPO = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 300
ANSWER_SECONDS = 120
FIRST_QUESTION = "Describe the image."
SECOND_QUESTION = "What colour is it?"
VALID_FIELDS = dict(answer_length=12, steps="", threshold=0.95, algorithm="maskgit_plus", temperature=0, top_p=1,
                    use_cache=True, template="")


def browser_tools() -> tuple[str, str]:
    """Chromium and its driver, or a skip naming what is missing (CI installs them: .ci/run)."""
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install '.[demo]'")
    pytest.importorskip("selenium", reason="selenium is not installed: pip install '.[demo]'")
    browser = next((found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("Chromium or chromedriver not found: apt-get install chromium chromium-driver")
    return browser, driver


def drawn_picture() -> Image.Image:
    """A small picture with shapes, drawn here (no file from the repository)."""
    image = Image.new("RGB", (96, 72), (250, 245, 230))
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 10, 44, 46), fill=(30, 80, 200))
    draw.rectangle((52, 20, 88, 60), fill=(220, 40, 40))
    return image


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------------------------------------------
# The server, the browser, and the reference answers
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Iterator[dict]:
    """`python -m dimple demo --host 127.0.0.1 --port PORT --concurrency 2` on the bundled checkpoint (visitors'
    turns decoded together on the batching engine), holding every answer after its first step until the test
    creates the release file."""
    browser_tools()
    home = tmp_path_factory.mktemp("demo-home")
    port, release = free_port(), home / "release"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "OMP_", "GRADIO_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(home), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               GRADIO_TEMP_DIR=str(home / "gradio"), **{HOLD_AFTER_FIRST_STEP: str(release)})
    url = f"http://127.0.0.1:{port}"
    with open(home / "demo.log", "w+") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dimple", "demo", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
             "--concurrency", "2"],
            cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
        )
        try:
            wait_until_serving(process, url, log)
            yield {"url": url, "release": release, "log": log}
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_until_serving(process: subprocess.Popen, url: str, log) -> None:
    """Until the demo prints its address and the page answers; fail with its log if it dies or stalls."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        log.seek(0)
        printed = f"running on {url}" in log.read()
        if process.poll() is not None:
            log.seek(0)
            pytest.fail(f"dimple demo exited with {process.returncode}:\n{log.read()[-4000:]}")
        if printed:
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.status == 200
                return
        if time.monotonic() > deadline:
            pytest.fail(f"dimple demo did not print its address within {STARTUP_SECONDS} s")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo-screenshots")


@pytest.fixture(scope="module")
def page(demo, screenshots):
    """Headless Chromium (Debian's, through its chromedriver) on the demo page."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = browser_tools()
    options = Options()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(demo["url"])
        wait_for(driver, lambda: driver.find_elements("css selector", "#dimple-input textarea"), 60, "the page")
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def local():
    """The bundled checkpoint in this process: the reference for every answer the page shows."""
    return DimpleModel.from_pretrained(BUNDLED_CHECKPOINT).eval(), DimpleProcessor.from_pretrained(BUNDLED_CHECKPOINT)


@pytest.fixture(scope="module")
def picture_file(tmp_path_factory) -> tuple[Path, Image.Image]:
    path = tmp_path_factory.mktemp("demo-picture") / "shapes.png"
    image = drawn_picture()
    image.save(path)
    return path, image


def expected_answer(local, conversation: list[dict], **settings) -> tuple[str, int]:
    """What `model.generate` answers for this conversation (cut at end-of-text), and its forward passes."""
    model, processor = local
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.inference_mode():
        output = model.generate(**inputs, **settings, return_dict_in_generate=True)
    answer = output.sequences[:, inputs["input_ids"].shape[1]:]
    return processor.post_process_image_text_to_text(answer)[0], output.num_forward_passes


# --------------------------------------------------------------------------------------------------------------
# Driving the page
# --------------------------------------------------------------------------------------------------------------


def wait_for(driver, condition, seconds: float, what: str):
    """Poll `condition` until it holds; an element replaced while it was read (Gradio re-renders) is read again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    waiting = WebDriverWait(driver, seconds, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,))
    return waiting.until(lambda _: condition(), message=f"waited {seconds} s for {what}")


def canvas_state(driver) -> dict[str, str]:
    canvas = driver.find_element("css selector", "#dimple-canvas .dimple-canvas")
    return {name: canvas.get_attribute(f"data-{name}") for name in ("step", "masks", "state")}


def bot_messages(driver) -> list[str]:
    """The assistant messages' raw text (their accessible labels; the shown text is rendered Markdown)."""
    labels = [element.get_attribute("aria-label") or "" for element in
              driver.find_elements("css selector", '#dimple-chat [data-testid="bot"]')]
    return [label.removeprefix("bot's message: ") for label in labels]


def status_text(driver) -> str:
    return driver.find_element("css selector", "#dimple-status").text


def set_field(driver, elem_id: str, value) -> None:
    """Type into a setting's input the way a person does (select all, type, leave the field)."""
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element("css selector", f"#{elem_id} input:not([type=file]), #{elem_id} textarea")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.BACKSPACE)
    field.send_keys(str(value), Keys.TAB)


def ask(driver, question: str, picture: Path | None = None) -> None:
    from selenium.webdriver.common.keys import Keys

    if picture is not None:
        driver.find_element("css selector", '#dimple-input input[type="file"]').send_keys(str(picture))
        wait_for(driver, lambda: driver.find_elements("css selector", "#dimple-input .thumbnails img"), 30,
                 "the uploaded picture's thumbnail")
    box = driver.find_element("css selector", "#dimple-input textarea")
    box.send_keys(question)
    box.send_keys(Keys.ENTER)


def wait_for_answer(driver, answers_before: int) -> tuple[str, int]:
    """The next assistant answer and its forward passes, once the canvas is done and the answer and its statistics
    are in the chat; the canvas's last step is the last forward pass."""
    wait_for(driver, lambda: canvas_state(driver)["state"] == "done" and len(bot_messages(driver)) >= answers_before
             + 2, ANSWER_SECONDS, "the final answer")
    answer, stats = bot_messages(driver)[answers_before: answers_before + 2]
    shown = re.fullmatch(r"\*(\d+) forward passes · \d+\.\d\d tokens per forward · \d+\.\d\d s\*", stats)
    assert shown, stats
    assert canvas_state(driver) == {"step": shown[1], "masks": "0", "state": "done"}
    return answer, int(shown[1])


# --------------------------------------------------------------------------------------------------------------
# The browser tests (in order: they continue one conversation)
# --------------------------------------------------------------------------------------------------------------


def test_a_picture_question_denoises_live_then_answers_as_generate(page, demo, local, picture_file, screenshots):
    path, image = picture_file
    ask(page, FIRST_QUESTION, path)
    # The decoder holds after its first step: that draft must be on the page, masks and all, with no answer yet.
    wait_for(page, lambda: canvas_state(page)["state"] == "denoising", ANSWER_SECONDS, "the first draft")
    state = canvas_state(page)
    assert state["step"] == "1" and int(state["masks"]) > 0, state
    shown = page.find_element("css selector", "#dimple-canvas .tokens")
    assert shown.find_elements("css selector", ".tok.mask")
    assert shown.find_elements("css selector", ".tok[data-step='1']")
    assert bot_messages(page) == []
    page.save_screenshot(str(screenshots / "mid-decoding.png"))
    demo["release"].touch()

    shown = wait_for_answer(page, answers_before=0)
    page.save_screenshot(str(screenshots / "answered.png"))
    conversation = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": FIRST_QUESTION}]}]
    assert shown == expected_answer(local, conversation)
    answer = shown[0]
    assert status_text(page).startswith("Done: ") and "forward passes" in status_text(page)
    demo["first_answer"] = answer


def test_a_follow_up_with_changed_settings_is_sent_with_the_history(page, demo, local, picture_file, screenshots):
    _, image = picture_file
    set_field(page, "setting-length", 6)
    set_field(page, "setting-threshold", 0)
    ask(page, SECOND_QUESTION)
    shown = wait_for_answer(page, answers_before=2)
    page.save_screenshot(str(screenshots / "follow-up.png"))
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": FIRST_QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": demo["first_answer"]}]},
        {"role": "user", "content": [{"type": "text", "text": SECOND_QUESTION}]},
    ]
    assert shown == expected_answer(local, conversation, max_new_tokens=6, alg_p_threshold=0.0)
    demo["last_run_steps"] = shown[1]


@pytest.mark.parametrize(
    ("elem_id", "bad", "message"),
    [
        ("setting-threshold", 1.5, "Threshold must be a number in [0, 1], got 1.5."),
        ("setting-top-p", 0, "Top-p must be a number in (0, 1], got 0."),
        ("setting-template", "no slots here", "The template has no <|mask|> slot to fill"),
    ],
)
def test_a_bad_setting_is_a_readable_message_not_a_trace(page, screenshots, elem_id, bad, message):
    good = page.find_element("css selector", f"#{elem_id} input, #{elem_id} textarea").get_attribute("value")
    answers = len(bot_messages(page))
    set_field(page, elem_id, bad)
    ask(page, "Is this refused?")
    wait_for(page, lambda: message in status_text(page), 30, f"the message {message!r}")
    page.save_screenshot(str(screenshots / f"refused-{elem_id}.png"))
    assert "Traceback" not in page.page_source
    assert len(bot_messages(page)) == answers
    # The refused question stays in the box, to send again once the setting is fixed.
    assert page.find_element("css selector", "#dimple-input textarea").get_attribute("value") == "Is this refused?"
    set_field(page, "dimple-input", "")
    set_field(page, elem_id, good)


def test_the_last_run_exports_as_gif_and_html(page, demo):
    page.find_element("css selector", "#dimple-export-button").click()
    links = wait_for(page, lambda: page.find_elements("css selector", "#dimple-export a[href]"), 60, "the exports")
    targets = {link.get_attribute("href").rsplit("/", 1)[1]: link.get_attribute("href") for link in links}
    assert {"denoising.gif", "denoising.html"} <= set(targets), targets
    with urllib.request.urlopen(targets["denoising.html"], timeout=30) as response:
        exported = response.read().decode()
    # The last run is the follow-up: one row per step, the last without masks.
    steps = demo["last_run_steps"]
    assert exported.count('class="step"') == steps and f"step {steps} (0 masks left)" in exported
    with urllib.request.urlopen(targets["denoising.gif"], timeout=30) as response:
        assert response.read(6) == b"GIF89a"


def test_clear_starts_over(page, demo, local, picture_file):
    page.find_element("css selector", "#dimple-clear").click()
    wait_for(page, lambda: bot_messages(page) == [] and canvas_state(page)["state"] == "idle", 30, "a cleared page")
    set_field(page, "setting-length", 12)
    set_field(page, "setting-threshold", 0.95)
    ask(page, SECOND_QUESTION)
    conversation = [{"role": "user", "content": [{"type": "text", "text": SECOND_QUESTION}]}]
    shown = wait_for_answer(page, answers_before=0)
    assert shown == expected_answer(local, conversation)
    demo["cleared_answer"] = shown[0]


def test_two_visitors_at_once_each_get_their_own_answer(page, demo, local):
    """A second tab is a second visitor: both ask at once (Gradio queues them); each answer is generate's for that
    visitor's own conversation, so neither sees the other's turns."""
    first = page.current_window_handle
    page.switch_to.new_window("tab")
    try:
        page.get(demo["url"])
        wait_for(page, lambda: page.find_elements("css selector", "#dimple-input textarea"), 60, "the second page")
        ask(page, FIRST_QUESTION)
        page.switch_to.window(first)
        ask(page, "And the shapes?")
        mine = wait_for_answer(page, answers_before=2)
        page.switch_to.window(page.window_handles[-1])
        theirs = wait_for_answer(page, answers_before=0)
    finally:
        if page.current_window_handle != first:
            page.close()
        page.switch_to.window(first)
    assert theirs == expected_answer(local, [{"role": "user", "content": [{"type": "text", "text": FIRST_QUESTION}]}])
    assert mine == expected_answer(local, [
        {"role": "user", "content": [{"type": "text", "text": SECOND_QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": demo["cleared_answer"]}]},
        {"role": "user", "content": [{"type": "text", "text": "And the shapes?"}]},
    ])


# --------------------------------------------------------------------------------------------------------------
# Without a browser: settings, canvas, command line, Space folder
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("answer_length", "", "Answer length is empty"),
        ("answer_length", 0, "Answer length must be a whole number from 1 to 1024, got 0."),
        ("answer_length", 2.5, "got 2.5"),
        ("steps", -1, "Steps must be a whole number from 0 to 1024"),
        ("threshold", float("nan"), "Threshold must be a number in [0, 1], got nan."),
        ("algorithm", "fastest", "Algorithm must be one of origin, origin-ratio"),
        ("temperature", "warm", "Temperature must be a number in [0, 10], got 'warm'."),
        ("top_p", 1.01, "Top-p must be a number in (0, 1], got 1.01."),
    ],
)
def test_each_bad_setting_names_the_field(field, value, message):
    with pytest.raises(ValueError) as caught:
        parse_settings(**{**VALID_FIELDS, field: value})
    assert message in str(caught.value)


def test_settings_are_read_from_the_fields():
    settings = parse_settings(**{**VALID_FIELDS, "steps": 4.0, "answer_length": "8", "template": "  a<|mask|> "})
    assert (settings.steps, settings.answer_length, settings.template) == (4, 8, "a<|mask|>")
    assert parse_settings(**{**VALID_FIELDS, "steps": 0}).steps is None  # 0: one step per answer token


def test_the_canvas_shades_each_token_by_the_step_that_committed_it():
    processor = DimpleProcessor.from_pretrained(BUNDLED_CHECKPOINT)
    mask = processor.tokenizer.mask_token_id
    words = processor.tokenizer("two blue circles", add_special_tokens=False).input_ids[:3]
    recorder = CanvasRecorder(mask, None, on_draft=lambda _: None)
    recorder.put(torch.tensor([[1, 2]]))
    recorder.put_draft(torch.tensor([[mask, words[1], mask]]))
    middle = canvas_html(recorder, processor.tokenizer, total_steps=3)
    recorder.put_draft(torch.tensor([[words[0], words[1], words[2]]]))
    last = canvas_html(recorder, processor.tokenizer, total_steps=3)
    assert recorder.committed_at == [2, 1, 2]
    assert 'data-step="1" data-masks="2" data-state="denoising"' in middle and middle.count("tok mask") == 2 + 1
    assert last.count('data-step="2" title') == 2 and last.count('data-step="1" title') == 1
    assert 'data-masks="0"' in last and "step 3" in last  # the legend names the last step of the budget


@pytest.mark.parametrize("batching", [False, True], ids=["generate", "engine"])
def test_a_structure_prior_turn_streams_every_step_and_answers_as_generate(local, batching):
    model, processor = local
    template_text = "It is <|mask|><|mask|><|mask|>."
    settings = parse_settings(**{**VALID_FIELDS, "template": template_text})
    conversation = [user_message(SECOND_QUESTION, [])]
    with DiffusionEngine(model, max_batch_size=2) if batching else nullcontext() as engine:
        updates = list(decode_turn(model, processor, conversation, settings, threading.Event(), engine))
    canvases, result = updates[:-1], updates[-1]
    assert isinstance(result, TurnResult)

    template = processor.tokenizer(template_text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.inference_mode():
        output = model.generate(**inputs, response_template=template, return_dict_in_generate=True)
    answer_ids = output.sequences[:, inputs["input_ids"].shape[1]:]
    assert result.answer == processor.batch_decode(answer_ids, skip_special_tokens=True)[0]
    assert result.answer.startswith("It is ") and result.answer.endswith(".")
    # One canvas per forward pass plus the finished one; the template's fixed tokens are drawn as the prior.
    assert result.forward_passes == output.num_forward_passes == len(canvases) - 1
    assert [re.search(r'data-step="(\d+)"', canvas)[1] for canvas in canvases[:-1]] == [
        str(step) for step in range(1, result.forward_passes + 1)]
    fixed = int((template != processor.tokenizer.mask_token_id).sum())
    assert 'data-state="done"' in canvases[-1] and canvases[0].count('class="tok prior"') == fixed + 1  # + legend
    assert torch.equal(result.run.drafts[-1], answer_ids[0]) and torch.equal(result.run.template, template)
    assert result.tokens_per_forward == pytest.approx(float(output.tokens_per_forward[0]))


@pytest.mark.parametrize("batching", [False, True], ids=["generate", "engine"])
def test_a_visitor_who_leaves_stops_the_decoding(local, batching):
    model, processor = local
    stop = threading.Event()
    stop.set()
    settings = parse_settings(**VALID_FIELDS)
    with DiffusionEngine(model, max_batch_size=2) if batching else nullcontext() as engine:
        turns = decode_turn(model, processor, [user_message(SECOND_QUESTION, [])], settings, stop, engine)
        with pytest.raises(Stopped):
            next(turns)
        if batching:  # the engine dropped the request: its row is freed and the engine answers the next one
            deadline = time.monotonic() + 30
            while engine.active and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine.active == 0
            answer = list(decode_turn(model, processor, [user_message(SECOND_QUESTION, [])], settings,
                                      threading.Event(), engine))[-1].answer
            assert answer == expected_answer(local, [user_message(SECOND_QUESTION, [])])[0]
    assert not [thread for thread in threading.enumerate() if thread.name == "dimple-demo-turn" and thread.is_alive()]


def test_an_empty_message_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match="The message is empty; type a question"):
        user_message("  ", [])


def test_a_bad_port_is_one_line_before_anything_loads(capsys):
    assert dimple_main(["demo", "--port", "70000"]) == 2
    assert capsys.readouterr().err == "dimple: error: --port must lie in 1..65535, got 70000\n"


def test_the_written_space_runs_the_bundled_checkpoint(tmp_path):
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install '.[demo]'")
    space = write_space(tmp_path / "space", None)
    front_matter = (space / "README.md").read_text().split("---\n")[1]
    assert "sdk: gradio\n" in front_matter and "app_file: app.py\n" in front_matter
    assert (space / "dimple" / "tiny" / "checkpoint" / "model.safetensors").is_file()
    assert (space / "dimple" / "demo" / "app.py").is_file()
    # The Space's app.py in a fresh interpreter, run from the Space folder (not as __main__, so it does not serve):
    # it imports the copied package and builds the page.
    script = ("import runpy, dimple\nspace = runpy.run_path('app.py', run_name='not_main')\n"
              "print(dimple.__file__, type(space['demo']).__name__)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", script], cwd=space, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(space / "dimple" / "__init__.py"), "Blocks"]


def test_the_space_requirements_follow_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    gradio = [pin for pin in project["optional-dependencies"]["demo"] if pin.startswith("gradio")]
    assert list(SPACE_REQUIREMENTS) == project["dependencies"] + gradio
