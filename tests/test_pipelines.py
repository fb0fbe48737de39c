"""transformers pipelines run Dimple's diffusion decoding end to end."""

import torch
from PIL import Image
from transformers import pipeline

import dimple  # noqa: F401  (registers the Auto classes)
from dimple.tiny.bundled import BUNDLED_CHECKPOINT


def test_image_text_to_text_pipeline_answers_a_chat_with_an_image():
    pipe = pipeline("image-text-to-text", model=str(BUNDLED_CHECKPOINT), dtype=torch.float32)
    image = Image.new("RGB", (64, 48), (255, 0, 0))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]}]
    result = pipe(text=messages, generate_kwargs={"max_new_tokens": 6, "steps": 3})
    reply = result[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and isinstance(reply["content"], str)

    inputs = pipe.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    direct = pipe.model.generate(**inputs, max_new_tokens=6, steps=3)
    expected = pipe.processor.post_process_image_text_to_text(direct[:, inputs["input_ids"].shape[1] :])[0]
    assert reply["content"] == expected


def test_text_generation_pipeline_passes_decoding_settings_through():
    pipe = pipeline("text-generation", model=str(BUNDLED_CHECKPOINT), dtype=torch.float32)
    calls = []
    original = pipe.model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    pipe.model.generate = spy
    result = pipe([{"role": "user", "content": "Hello"}], max_new_tokens=5, steps=2)
    assert result[0]["generated_text"][-1]["role"] == "assistant"
    assert calls[0]["steps"] == 2 and calls[0]["max_new_tokens"] == 5


def test_pipelines_in_a_fresh_process_through_remote_code(tmp_path):
    """A Hub user's view: no `dimple` package, only the folder's remote code (written by `install-code`)."""
    import textwrap

    from isolated import run_without_dimple

    from dimple.remote_code import install_code

    folder = tmp_path / "checkpoint"
    install_code(BUNDLED_CHECKPOINT, out=folder)
    script = textwrap.dedent(
        f"""
        import sys
        from PIL import Image
        from transformers import pipeline

        calls = []
        def spy_on(pipe):
            original = pipe.model.generate
            def spy(*args, **kwargs):
                calls.append(kwargs)
                return original(*args, **kwargs)
            pipe.model.generate = spy

        pipe = pipeline("image-text-to-text", model={str(folder)!r}, trust_remote_code=True)
        assert type(pipe.model).__module__.startswith("transformers_modules."), type(pipe.model).__module__
        spy_on(pipe)
        image = Image.new("RGB", (64, 48), (30, 160, 40))
        messages = [{{"role": "user", "content": [{{"type": "image", "image": image}},
                                                 {{"type": "text", "text": "What colour?"}}]}}]
        reply = pipe(text=messages, generate_kwargs={{"max_new_tokens": 6, "steps": 3}})[0]["generated_text"][-1]
        assert reply["role"] == "assistant"
        assert calls[-1]["max_new_tokens"] == 6 and calls[-1]["steps"] == 3
        inputs = pipe.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        direct = pipe.model.generate(**inputs, max_new_tokens=6, steps=3)
        expected = pipe.processor.post_process_image_text_to_text(direct[:, inputs["input_ids"].shape[1]:])[0]
        assert reply["content"] == expected, (reply, expected)

        text_pipe = pipeline("text-generation", model={str(folder)!r}, trust_remote_code=True)
        spy_on(text_pipe)
        result = text_pipe([{{"role": "user", "content": "Hello"}}], max_new_tokens=5, alg_p_threshold=0.5)
        assert result[0]["generated_text"][-1]["role"] == "assistant"
        assert calls[-1]["max_new_tokens"] == 5 and calls[-1]["alg_p_threshold"] == 0.5
        assert "dimple" not in sys.modules
        print("pipelines ok")
        """
    )
    workdir = tmp_path / "fresh"
    workdir.mkdir()
    result = run_without_dimple(script, workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("pipelines ok")


def resolved_configs(pipe) -> list:
    """Spy on the decoding settings each generate call ends up with (after pipeline and model defaults)."""
    configs = []
    original = pipe.model._resolve_generation_config

    def spy(*args, **kwargs):
        config, model_inputs = original(*args, **kwargs)
        configs.append(config)
        return config, model_inputs

    pipe.model._resolve_generation_config = spy
    return configs


def test_pipelines_decode_as_the_model_is_configured_unless_asked_to_sample():
    """Both pipelines follow the model's generation config (greedy, its answer length) instead of adding their own
    defaults (text-generation: sampling at temperature 0.7; both: 256 new tokens); sampling when asked."""
    chat_pipe = pipeline("text-generation", model=str(BUNDLED_CHECKPOINT), dtype=torch.float32)
    configs = resolved_configs(chat_pipe)
    reply = chat_pipe([{"role": "user", "content": "Hello"}])[0]["generated_text"][-1]["content"]
    assert (configs[-1].temperature, configs[-1].max_new_tokens) == (0.0, chat_pipe.model.generation_config.max_new_tokens)
    inputs = chat_pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    direct = chat_pipe.model.generate(**inputs)
    assert reply == chat_pipe.tokenizer.decode(direct[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    chat_pipe([{"role": "user", "content": "Hello"}], do_sample=True, max_new_tokens=4)
    assert configs[-1].temperature > 0

    image_pipe = pipeline("image-text-to-text", model=str(BUNDLED_CHECKPOINT), dtype=torch.float32)
    configs = resolved_configs(image_pipe)
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (84, 84), "white")},
                                             {"type": "text", "text": "Describe the image."}]}]
    image_pipe(text=messages)
    assert (configs[-1].temperature, configs[-1].max_new_tokens) == (0.0, image_pipe.model.generation_config.max_new_tokens)
