"""Bad input: every mistake gets one clear error naming the problem and the fix; determinism under seeds.

One test (or one parametrized test) per item of the bad-input audit, in the order of the README's "Common
errors" table. Errors raised by `generate` must come before any forward pass.
"""

import contextlib
import functools
import http.server
import io
import math
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from dimple import DimpleModel
from dimple.tiny_checkpoint import BUNDLED_CHECKPOINT, build_tiny_model
from prompts import chat, picture


def encode(processor, prompts: list[tuple[str, int]], images=None):
    texts = [processor.apply_chat_template(chat(text, n), add_generation_prompt=True) for text, n in prompts]
    return processor(text=texts, images=images, padding="longest", return_tensors="pt")


@pytest.fixture(scope="module")
def text_batch(processor):
    """Two prompts of different lengths: row 0 is left-padded."""
    return encode(processor, [("Hi.", 0), ("A much longer prompt about the cat.", 0)])


@pytest.fixture(scope="module")
def image_inputs(processor):
    return encode(processor, [("Describe it.", 1)], images=[picture(56, 84)])


@pytest.fixture
def no_forward(model):
    """Fails the test if the model runs a forward pass while the block executes."""
    calls = []
    handle = model.register_forward_pre_hook(lambda *args: calls.append(1))
    yield
    handle.remove()
    assert not calls, "the error must come before any forward pass"


# --- prompt layout ------------------------------------------------------------------------------------------


def test_mask_token_inside_the_prompt(model, text_batch, no_forward):
    ids = text_batch["input_ids"].clone()
    ids[1, 3] = model.config.mask_token_id
    with pytest.raises(ValueError, match=r"contains the mask token.*response_template"):
        model.generate(input_ids=ids, attention_mask=text_batch["attention_mask"], max_new_tokens=4)


def test_right_padded_batch_is_refused_not_repadded(model, text_batch, no_forward):
    """Decision: refuse (re-padding behind the user's back would change what they think they passed)."""
    mask = text_batch["attention_mask"]
    ids = torch.stack([row.roll(-int((m == 0).sum())) for row, m in zip(text_batch["input_ids"], mask)])
    with pytest.raises(ValueError, match=r"right-padded.*left-padded \(the processor pads on the left\)"):
        model.generate(input_ids=ids, attention_mask=mask.flip(1), max_new_tokens=4)


def test_padding_between_tokens_and_non_binary_masks_are_refused(model, text_batch, no_forward):
    holes = text_batch["attention_mask"].clone()
    holes[1, 2] = 0
    with pytest.raises(ValueError, match="padding between prompt tokens; only left padding"):
        model.generate(input_ids=text_batch["input_ids"], attention_mask=holes, max_new_tokens=4)
    with pytest.raises(ValueError, match="only 0 .padding. and 1 .token."):
        model.generate(input_ids=text_batch["input_ids"], attention_mask=text_batch["attention_mask"] * 2)


def test_missing_attention_mask_with_padding_present(model, text_batch, no_forward):
    with pytest.raises(ValueError, match=r"pad token .* no attention_mask was given.*pass the attention_mask"):
        model.generate(input_ids=text_batch["input_ids"], max_new_tokens=4)


def test_missing_attention_mask_without_padding_means_all_tokens(model, processor):
    inputs = encode(processor, [("Hello there.", 0)])
    with_mask = model.generate(**inputs, max_new_tokens=6)
    without = model.generate(input_ids=inputs["input_ids"], max_new_tokens=6)
    assert torch.equal(with_mask, without)


# --- images -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("placeholders", "images"), [(1, 0), (0, 1), (1, 2), (2, 1), (2, 3)])
def test_processor_refuses_image_count_mismatch(processor, placeholders, images):
    with pytest.raises(ValueError, match=f"text has {placeholders} image placeholders but {images} images"):
        encode(processor, [("Look.", placeholders)], images=[picture(56, 56, i) for i in range(images)] or None)


def test_image_placeholders_without_images_in_generate(model, image_inputs, no_forward):
    with pytest.raises(ValueError, match=r"holds 6 image tokens but no images were given; pass the `pixel_values`"):
        model.generate(input_ids=image_inputs["input_ids"], max_new_tokens=4)
    with pytest.raises(ValueError, match="go together; pass both"):
        model.generate(
            input_ids=image_inputs["input_ids"], image_grid_thw=image_inputs["image_grid_thw"], max_new_tokens=4
        )


def test_images_without_placeholders_in_generate(model, processor, image_inputs, no_forward):
    text_only = encode(processor, [("Describe it.", 0)])
    with pytest.raises(ValueError, match="holds 0 image tokens but the images give 6 features"):
        model.generate(
            **text_only, pixel_values=image_inputs["pixel_values"], image_grid_thw=image_inputs["image_grid_thw"]
        )


def test_more_images_than_placeholders_in_generate(model, processor, image_inputs, no_forward):
    two = encode(processor, [("Describe them.", 2)], images=[picture(56, 84), picture(56, 56)])
    with pytest.raises(ValueError, match="holds 6 image tokens but the images give 10 features"):
        model.generate(**{**image_inputs, "pixel_values": two["pixel_values"], "image_grid_thw": two["image_grid_thw"]})


def test_image_token_count_differs_from_features(model, image_inputs, no_forward):
    ids = image_inputs["input_ids"].clone()
    ids[ids == model.config.image_token_id] = 40  # one image placeholder's tokens replaced by text
    with pytest.raises(ValueError, match="holds 0 image tokens but the images give 6 features"):
        model.generate(**{**image_inputs, "input_ids": ids}, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"pixel_values has shape \(20, 1176\) but image_grid_thw describes 24"):
        model.generate(**{**image_inputs, "pixel_values": image_inputs["pixel_values"][:20]}, max_new_tokens=4)


def test_forward_checks_images_like_generate(model, image_inputs):
    with pytest.raises(ValueError, match="image tokens but no images were given"):
        model(input_ids=image_inputs["input_ids"])


def encoded_png(width: int = 64, height: int = 64) -> bytes:
    buffer = io.BytesIO()
    picture(width, height).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("damage", ["truncated", "not_an_image", "truncated_opened"])
def test_corrupt_or_truncated_image_file(processor, tmp_path, damage):
    data = encoded_png()
    path = tmp_path / "broken.png"
    path.write_bytes(b"this is not an image" if damage == "not_an_image" else data[: len(data) // 2])
    image = Image.open(path) if damage == "truncated_opened" else str(path)
    with pytest.raises(ValueError, match="Could not decode an image .*corrupt, truncated or not an image"):
        encode(processor, [("Look.", 1)], images=[image])


@pytest.mark.parametrize(("width", "height"), [(0, 0), (1, 1), (1, 200), (200, 27)])
def test_zero_size_or_one_pixel_image(processor, width, height):
    with pytest.raises(ValueError, match=f"{width}x{height} .* too small.*at least 28x28"):
        encode(processor, [("Look.", 1)], images=[Image.new("RGB", (width, height))])


def test_images_above_max_pixels_are_resized_down(model, processor):
    inputs = encode(processor, [("Look.", 1)], images=[picture(3000, 2000)])
    patches = int(inputs["image_grid_thw"].prod())
    max_pixels = processor.image_processor.size["longest_edge"]  # a pixel count (see image_processing_dimple)
    assert inputs["pixel_values"].shape[0] == patches
    assert patches * 14 * 14 <= max_pixels
    out = model.generate(**inputs, max_new_tokens=4)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)


# --- lengths and settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 2048},
        {"max_new_tokens": 10**12},  # refused before a canvas of this size is allocated
        {"max_length": 10**6},
        {"response_template": torch.full((2040,), 7)},
    ],
)
def test_prompt_plus_answer_above_the_model_positions(model, text_batch, kwargs, no_forward):
    with pytest.raises(ValueError, match=r"exceed the model's max_position_embeddings \(2048\); shorten"):
        model.generate(**text_batch, **kwargs)


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (0, "steps must be a positive integer, got 0"),
        (-3, "steps must be a positive integer"),
        (2.5, "steps must be a positive integer, got 2.5"),
        (True, "steps must be a positive integer, got True"),
        (10**9, r"steps=1000000000 is more than any answer needs .*at most 10000"),
    ],
)
def test_steps_below_one_or_absurd(model, text_batch, steps, message, no_forward):
    with pytest.raises(ValueError, match=message):
        model.generate(**text_batch, steps=steps, max_new_tokens=4)


@pytest.mark.parametrize(
    ("threshold", "message"),
    [
        (-0.1, r"alg_p_threshold must lie in \[0, 1\]"),
        (1.5, r"alg_p_threshold must lie in \[0, 1\].*None or 0 to disable"),
        (math.nan, "alg_p_threshold must be a finite number"),
        ("0.9", "alg_p_threshold must be a finite number, got '0.9'"),
    ],
)
def test_threshold_outside_zero_one(model, text_batch, threshold, message, no_forward):
    with pytest.raises(ValueError, match=message):
        model.generate(**text_batch, alg_p_threshold=threshold, max_new_tokens=4)


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_threshold_bounds_are_accepted(model, text_batch, threshold):
    out = model.generate(**text_batch, alg_p_threshold=threshold, max_new_tokens=4)
    assert not (out == model.config.mask_token_id).any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": math.nan}, "temperature must be a finite number"),
        ({"temperature": math.inf}, "temperature must be a finite number"),
        ({"alg_temp": math.nan}, "alg_temp must be a finite number"),
        ({"top_p": math.nan}, "top_p must be a finite number"),
        ({"alg": "foo"}, "Unknown alg 'foo'; choose one of origin"),
        ({"decoding_pipeline": "bar"}, "Unknown decoding_pipeline 'bar'; choose one of dim, dream"),
    ],
)
def test_other_invalid_settings(model, text_batch, kwargs, message, no_forward):
    with pytest.raises(ValueError, match=message):
        model.generate(**text_batch, **kwargs)


def test_unknown_attn_implementation():
    with pytest.raises(ValueError, match='attn_implementation="foo"` is not supported'):
        DimpleModel.from_pretrained(BUNDLED_CHECKPOINT, attn_implementation="foo")


# --- dtypes and devices -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_ids", "error", "message"),
    [
        (lambda ids: ids.float(), TypeError, "input_ids must hold integer token ids, got dtype torch.float32"),
        (lambda ids: ids.bool(), TypeError, "input_ids must hold integer token ids, got dtype torch.bool"),
        (lambda ids: ids.tolist(), TypeError, 'as a torch.LongTensor, got list; call the processor with return_t'),
        (lambda ids: ids[0], ValueError, r"of shape \(batch, prompt_len\), got \(\d+,\); add a batch dimension"),
        (lambda ids: ids + 1000, ValueError, r"outside the model's vocabulary \[0, 512\)"),
        (lambda ids: ids - 1000, ValueError, r"outside the model's vocabulary .*own processor/tokenizer"),
    ],
)
def test_wrong_input_ids(model, processor, make_ids, error, message, no_forward):
    ids = encode(processor, [("Hello.", 0)])["input_ids"]
    with pytest.raises(error, match=message):
        model.generate(input_ids=make_ids(ids), max_new_tokens=4)


def test_integer_ids_of_another_width_and_float_masks_are_cast(model, text_batch):
    expected = model.generate(**text_batch, max_new_tokens=6)
    narrow = model.generate(
        input_ids=text_batch["input_ids"].int(), attention_mask=text_batch["attention_mask"].float(), max_new_tokens=6
    )
    assert narrow.dtype == torch.long and torch.equal(narrow, expected)


def test_pixel_values_dtypes(model, image_inputs):
    expected = model.generate(**image_inputs, max_new_tokens=6)
    double = image_inputs["pixel_values"].double()
    as_double = model.generate(**{**image_inputs, "pixel_values": double}, max_new_tokens=6)
    assert torch.equal(as_double, expected)
    with pytest.raises(TypeError, match="pixel_values must be floating point .*not raw pixels"):
        model.generate(**{**image_inputs, "pixel_values": image_inputs["pixel_values"].to(torch.uint8)})
    with pytest.raises(TypeError, match="image_grid_thw must be integer"):
        model.generate(**{**image_inputs, "image_grid_thw": image_inputs["image_grid_thw"].float()})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_inputs_on_another_device_are_moved_to_the_model(processor, image_inputs):
    model = build_tiny_model(processor)
    expected = model.generate(**image_inputs, max_new_tokens=6)
    model.to("cuda")
    out = model.generate(**image_inputs, max_new_tokens=6)
    assert out.device.type == "cuda"
    assert torch.equal(out.cpu(), expected)


# --- hooks and structure priors -----------------------------------------------------------------------------


def shorter(step, x, logits):
    return x[:, :-1]


def rewrites_prompt(step, x, logits):
    x = x.clone()
    x[:, 0] = 5
    return x


@pytest.mark.parametrize(
    ("hook_name", "hook", "message"),
    [
        ("generation_tokens_hook_func", shorter, r"tokens_hook_func must return a tensor of shape \(2, \d+\)"),
        ("generation_tokens_hook_func", lambda s, x, l: None, "tokens_hook_func must return a tensor of shape"),
        ("generation_tokens_hook_func", rewrites_prompt, "changed prompt tokens; it may only change answer"),
        ("generation_logits_hook_func", lambda s, x, l: l[:, 1:], r"must return logits of shape \(2, \d+, 512\)"),
        ("generation_logits_hook_func", lambda s, x, l: None, "return the .modified. logits it was given"),
    ],
)
def test_hooks_with_wrong_shape_or_that_modify_the_prompt(model, text_batch, hook_name, hook, message):
    with pytest.raises(ValueError, match=message):
        model.generate(**text_batch, max_new_tokens=4, **{hook_name: hook})


def test_response_template_with_vision_or_unknown_tokens(model, text_batch, no_forward):
    mask = model.config.mask_token_id
    with pytest.raises(ValueError, match="response_template contains vision tokens"):
        model.generate(**text_batch, response_template=torch.tensor([mask, model.config.image_token_id]))
    with pytest.raises(ValueError, match=r"response_template holds ids outside the model's vocabulary"):
        model.generate(**text_batch, response_template=torch.tensor([mask, 99999]))


# --- determinism --------------------------------------------------------------------------------------------

SAMPLING_MODES = [
    {"temperature": 0.9},
    {"temperature": 1.0, "top_p": 0.9, "top_k": 20, "alg": "topk_margin"},
    {"alg": "origin", "alg_p_threshold": None},
    {"alg": "origin-ratio", "alg_p_threshold": None},
    {"alg": "entropy", "alg_temp": 0.5, "alg_p_threshold": None},
    {"decoding_pipeline": "dream", "alg": "origin", "temperature": 0.7},
]
GREEDY_MODES = [
    {"alg": alg, "decoding_pipeline": pipeline, "alg_p_threshold": threshold, "use_cache": cache}
    for alg in ("maskgit_plus", "topk_margin", "entropy", "autoregressive")
    for pipeline, threshold, cache in (("dim", 0.95, True), ("dim", None, False), ("dream", None, True))
]


@pytest.mark.parametrize("mode", SAMPLING_MODES, ids=lambda mode: "-".join(f"{k}={v}" for k, v in mode.items()))
def test_sampling_modes_repeat_under_the_same_seed(model, text_batch, mode):
    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return model.generate(**text_batch, max_new_tokens=10, steps=5, **mode)

    assert torch.equal(run(7), run(7))
    distinct = {tuple(run(seed).flatten().tolist()) for seed in range(6)}
    assert len(distinct) > 1, "the mode should actually sample"


@pytest.mark.parametrize("mode", GREEDY_MODES, ids=lambda mode: "-".join(f"{k}={v}" for k, v in mode.items()))
def test_greedy_modes_ignore_the_seed(model, text_batch, mode):
    outputs = []
    for seed in (0, 1, 12345):
        torch.manual_seed(seed)
        outputs.append(model.generate(**text_batch, max_new_tokens=10, steps=5, **mode))
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])


# --- configs that make no sense -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"num_attention_heads": 0}, ValueError, r"config.num_attention_heads must lie in \[1, 1024\], got 0"),
        ({"hidden_size": "64"}, TypeError, r"config.hidden_size must be an integer, got '64' \(str\)"),
        ({"vocab_size": -5}, ValueError, r"config.vocab_size must lie in \[1, 16777216\], got -5"),
        ({"num_hidden_layers": -1}, ValueError, r"config.num_hidden_layers must lie in \[1, 1024\], got -1"),
        ({"num_hidden_layers": 100000}, ValueError, r"num_hidden_layers must lie in \[1, 1024\], got 100000"),
        ({"num_attention_heads": 3}, ValueError, r"hidden_size \(64\) must be divisible by num_attention_heads"),
        ({"intermediate_size": 2**18, "hidden_size": 2**16, "num_attention_heads": 1024, "num_key_value_heads": 8,
          "mrope_section": [8, 12, 12], "num_hidden_layers": 1024}, ValueError, r"about [\d,]+B parameters"),
        ({"vision_config": {"depth": 0}}, ValueError, r"vision_config.depth must lie in \[1, 1024\], got 0"),
        ({"vision_config": {"num_heads": 3}}, ValueError, "vision_config.hidden_size .* divisible by"),
        ({"mask_token_id": 600}, ValueError, r"config.mask_token_id=600 lies outside the vocabulary \[0, 512\)"),
        ({"mask_token_id": -1}, ValueError, r"config.mask_token_id=-1 lies outside the vocabulary"),
        ({"mask_token_id": "<|mask|>"}, TypeError, "config.mask_token_id must be an integer token id"),
        ({"mask_token_id": 480}, ValueError, r"config.mask_token_id \(480\) equals config.pad_token_id"),
        ({"eos_token_id": [480, 488]}, ValueError, r"mask_token_id \(488\) equals config.eos_token_id"),
    ],
)
def test_config_values_that_make_no_sense(processor, overrides, error, message):
    from dimple.tiny_checkpoint import tiny_config

    with pytest.raises(error, match=message):
        tiny_config(processor, **overrides)


def test_config_edited_after_construction_is_checked_before_any_module_is_built(processor):
    from dimple.tiny_checkpoint import tiny_config

    config = tiny_config(processor)
    config.num_hidden_layers = 100000
    with pytest.raises(ValueError, match="num_hidden_layers must lie in"):
        DimpleModel(config)


def test_config_file_without_vision_config(tmp_path):
    from dimple import DimpleConfig

    (tmp_path / "config.json").write_text('{"model_type": "dimple", "hidden_size": 64}')
    with pytest.raises(ValueError, match="The Dimple config has no vision_config"):
        DimpleConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="The Dimple config has no vision_config"):
        DimpleModel.from_pretrained(tmp_path)


def test_truncated_tokenizer_file_is_named(tmp_path):
    import shutil

    from dimple import DimpleProcessor

    folder = tmp_path / "checkpoint"
    shutil.copytree(BUNDLED_CHECKPOINT, folder)
    data = (folder / "tokenizer.json").read_bytes()
    (folder / "tokenizer.json").write_bytes(data[:4096])
    with pytest.raises(ValueError, match=r"tokenizer.json is not valid JSON .*truncated or corrupt; re-download"):
        DimpleProcessor.from_pretrained(folder)


def test_absurd_num_return_sequences_is_refused_before_allocating(model, text_batch, no_forward):
    with pytest.raises(ValueError, match=r"num_return_sequences=10000000 is above 1024"):
        model.generate(**text_batch, num_return_sequences=10**7, max_new_tokens=4)


@pytest.mark.parametrize(
    ("mask_token_id", "message"),
    [
        ("pad", r"mask_token_id \(\d+\) equals pad_token_id"),
        (512, r"mask_token_id must be a token id inside the vocabulary \[0, 512\), got 512"),
        (-1, r"inside the vocabulary \[0, 512\), got -1"),
    ],
)
def test_mask_token_id_given_to_generate(model, text_batch, mask_token_id, message, no_forward):
    mask = model.config.pad_token_id if mask_token_id == "pad" else mask_token_id
    with pytest.raises(ValueError, match=message):
        model.generate(**text_batch, mask_token_id=mask, max_new_tokens=4)


def test_nan_logits_are_reported(processor, text_batch, caplog):
    """A warning, not an error: decoding cannot stop mid-loop without a host sync per step, and the output (other
    rows of a batch may be fine) is still returned for inspection. NaN weights are refused at load instead."""
    from transformers.utils import logging

    broken = build_tiny_model(processor)
    with torch.no_grad():
        broken.model.norm.weight[3] = float("nan")
    logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            broken.generate(**text_batch, max_new_tokens=6, steps=3, alg_p_threshold=None)
    finally:
        logging.disable_propagation()
    assert "The logits held NaN or inf at 3 of 3 step(s)" in caplog.text


# --- one way to read a picture ------------------------------------------------------------------------------


def sideways_jpeg(path) -> None:
    """A 84x56 picture stored sideways with EXIF orientation 6 (rotate 90° clockwise to view)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    picture(84, 56).save(path, exif=exif, quality=95)


def transparent_png(path) -> None:
    """Opaque shapes on a fully transparent background whose hidden colour is black."""
    pixels = np.zeros((56, 84, 4), dtype=np.uint8)
    pixels[10:40, 20:60] = (200, 30, 30, 255)
    pixels[30:50, 50:80] = (20, 40, 210, 128)
    Image.fromarray(pixels, mode="RGBA").save(path)


def sixteen_bit_png(path) -> None:
    ramp = (np.arange(56 * 84, dtype=np.uint32).reshape(56, 84) * 65535 // (56 * 84 - 1)).astype(np.uint16)
    Image.fromarray(ramp).save(path)


@contextlib.contextmanager
def served_folder(folder):
    """An HTTP server for `folder` on 127.0.0.1 (a free port), stopped on exit."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def pixels_by_every_route(processor, path) -> list[torch.Tensor]:
    """pixel_values for the same file as a path, a URL, bytes, a user-opened PIL image, and the CLI."""
    from dimple.cli import load_images

    with served_folder(path.parent) as url:
        routes = [str(path), f"{url}/{path.name}", path.read_bytes(), Image.open(path), load_images([str(path)])[0]]
        return [processor.image_processor(images=[route], return_tensors="pt")["pixel_values"] for route in routes]


@pytest.mark.parametrize("make", [sideways_jpeg, transparent_png, sixteen_bit_png])
def test_a_picture_reads_the_same_by_every_route(processor, tmp_path, make):
    path = tmp_path / f"picture.{'jpg' if make is sideways_jpeg else 'png'}"
    make(path)
    first, *others = pixels_by_every_route(processor, path)
    assert all(torch.equal(first, other) for other in others)


def test_exif_orientation_alpha_and_16_bit_are_applied(tmp_path):
    from dimple.image_processing_dimple import load_image

    sideways_jpeg(tmp_path / "sideways.jpg")
    assert load_image(tmp_path / "sideways.jpg").size == (56, 84)  # upright: width and height swapped
    transparent_png(tmp_path / "transparent.png")
    rgb = np.asarray(load_image(tmp_path / "transparent.png"))
    assert tuple(rgb[0, 0]) == (255, 255, 255)  # transparent background composited on white, not black
    assert tuple(rgb[20, 30]) == (200, 30, 30)
    assert tuple(rgb[45, 70]) == (137, 147, 232)  # half-transparent blue over white
    sixteen_bit_png(tmp_path / "grey16.png")
    grey = np.asarray(load_image(tmp_path / "grey16.png"))[..., 0]
    assert grey[0, 0] == 0 and grey[-1, -1] == 255 and 120 <= grey[28, 42] <= 135  # scaled, not clipped to white


@pytest.mark.parametrize(
    ("name", "message"),
    [("missing.png", r"Image file not found: .*missing.png"), (".", "is a folder, not an image file")],
)
def test_missing_path_or_folder_as_image(processor, tmp_path, name, message):
    with pytest.raises(ValueError, match=message):
        encode(processor, [("Look.", 1)], images=[str(tmp_path / name)])
