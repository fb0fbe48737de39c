"""Training: losses and masking, the SFT collator, Trainer, gradient checkpointing, LoRA, the trained tiny Dimple."""

import random

import pytest
import torch
from PIL import Image
from transformers import TrainingArguments

from dimple import DimpleModel, DimpleProcessor
from dimple.tiny.build import build_tiny_model, build_tiny_processor
from dimple.tiny.bundled import BUNDLED_CHECKPOINT
from dimple.tiny.train import ANSWER_SLOTS, example
from dimple.training import (
    IGNORE_INDEX,
    DimpleSFTCollator,
    DimpleTrainer,
    ar_loss,
    complementary_masks,
    diffusion_loss,
    diffusion_mask,
    diffusion_objective,
    padded_answer_length,
    sample_times,
)
from dimple.training.losses import ar_objective


def manual_ce(logits: torch.Tensor, target: int) -> float:
    """-log softmax(logits)[target], written out with exp/log so it does not share code with the library."""
    values = logits.double()
    return float(torch.log(torch.exp(values - values.max()).sum()) + values.max() - values[target])


@pytest.fixture(scope="module")
def processor() -> DimpleProcessor:
    return build_tiny_processor()


def chat(answer: str, colour=(200, 30, 30), question: str = "Colour?") -> dict:
    image = Image.new("RGB", (56, 56), colour)
    user = {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}
    return {"messages": [user, {"role": "assistant", "content": answer}]}


# --- losses and masks ---------------------------------------------------------------------------------------


def test_diffusion_loss_is_mean_ce_of_shifted_logits_on_masked_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.tensor([[1, 2, 3, 4, 5], [6, 5, 4, 3, 2]])
    masked = torch.zeros(2, 5, dtype=torch.bool)
    masked[0, 2] = masked[0, 4] = masked[1, 3] = True
    # Masks at (0, 2), (0, 4), (1, 3) are predicted by the logits one position earlier.
    terms = [manual_ce(logits[0, 1], 3), manual_ce(logits[0, 3], 5), manual_ce(logits[1, 2], 3)]
    assert float(diffusion_loss(logits, targets, masked)) == pytest.approx(sum(terms) / 3, rel=1e-5)

    t = torch.tensor([0.5, 0.25])
    weighted = (terms[0] / 0.5 + terms[1] / 0.5 + terms[2] / 0.25) / 3
    assert float(diffusion_loss(logits, targets, masked, t, time_weighting=True)) == pytest.approx(weighted, rel=1e-5)


def test_diffusion_loss_without_masks_is_zero_but_differentiable():
    logits = torch.randn(1, 4, 7, requires_grad=True)
    loss = diffusion_loss(logits, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_ar_loss_is_next_token_ce_over_labelled_positions():
    torch.manual_seed(1)
    logits = torch.randn(1, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 0, IGNORE_INDEX]])
    expected = (manual_ce(logits[0, 1], 3) + manual_ce(logits[0, 2], 0)) / 2
    assert float(ar_loss(logits, labels)) == pytest.approx(expected, rel=1e-5)


def test_mask_rates_follow_t_and_prompt_is_never_masked():
    answer = torch.zeros(3, 4000, dtype=torch.bool)
    answer[:, 1000:] = True
    generator = torch.Generator().manual_seed(0)
    masked = diffusion_mask(answer, torch.tensor([1.0, 0.3, 1e-9]), generator)
    assert not masked[:, :1000].any()
    assert masked[0, 1000:].all()
    assert abs(masked[1, 1000:].float().mean().item() - 0.3) < 0.03
    assert not masked[2].any()


def test_complementary_masks_partition_the_answer():
    generator = torch.Generator().manual_seed(3)
    answer = torch.rand(4, 50, generator=generator) < 0.6
    t = torch.tensor([0.01, 0.4, 0.8, 0.999])
    first, second = complementary_masks(answer, t, generator)
    assert torch.equal(first | second, answer)
    assert not (first & second).any()
    assert first.sum() > 0 and second.sum() > 0


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="bool tensor"):
        diffusion_mask(torch.ones(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="one time per row"):
        diffusion_mask(torch.ones(2, 3, dtype=torch.bool), torch.ones(3))
    masked = torch.zeros(1, 3, dtype=torch.bool)
    masked[0, 0] = True
    with pytest.raises(ValueError, match="Position 0 is masked"):
        diffusion_loss(torch.randn(1, 3, 5), torch.zeros(1, 3, dtype=torch.long), masked)


# --- collator -----------------------------------------------------------------------------------------------


def test_padded_answer_length_follows_the_released_rule():
    rng = random.Random(0)
    for n, upper in ((1, 2), (3, 4), (4, 8), (15, 16), (16, 32), (40, 48)):
        lengths = {padded_answer_length(n, rng) for _ in range(400)}
        assert min(lengths) == n + 1 and max(lengths) == upper
    assert {padded_answer_length(3, rng, upper=6) for _ in range(200)} == {4, 5, 6}


def test_collator_builds_the_training_format(processor):
    collator = DimpleSFTCollator(processor, seed=0)
    batch = collator([chat("red"), {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}])
    tokenizer = processor.tokenizer
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert int((batch["input_ids"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == 4
    for row, answer in enumerate(("red", "Hello there")):
        length = int(batch["attention_mask"][row].sum())
        ids, labels = batch["input_ids"][row, :length].tolist(), batch["labels"][row].tolist()
        supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
        # The answer sits right after "<|im_start|>assistant\n", is followed by >= 1 pad, and runs to the end.
        prompt = tokenizer.decode(ids[: supervised[0]])
        assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
        assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert supervised == list(range(supervised[0], length))
        answer_part = ids[supervised[0] :]
        assert answer_part[: len(answer_ids)] == answer_ids
        assert set(answer_part[len(answer_ids) :]) == {pad} and len(answer_part) > len(answer_ids)
        assert [labels[i] for i in supervised] == answer_part
        assert set(labels[length:]) <= {IGNORE_INDEX}
        assert not batch["attention_mask"][row, length:].any()
    with pytest.raises(TypeError, match="'messages'"):
        collator([{"text": "no messages"}])
    with pytest.raises(ValueError, match="assistant turn"):
        collator([{"messages": [{"role": "user", "content": "Hi"}]}])


def test_diffusion_objective_masks_only_answers(processor):
    model = build_tiny_model(processor)
    batch = DimpleSFTCollator(processor, seed=1)([chat("red square"), chat("blue", (20, 30, 200))])
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True)
    loss, _ = diffusion_objective(model, batch, model.config.mask_token_id, complementary=True)
    noisy = seen[0]
    assert noisy.shape[0] == 4
    answer = (batch["labels"] != IGNORE_INDEX).repeat(2, 1)
    is_mask = noisy == model.config.mask_token_id
    assert not (is_mask & ~answer).any()
    assert torch.equal(noisy[~is_mask], batch["input_ids"].repeat(2, 1)[~is_mask])
    # The two copies of each sample mask complementary halves of its answer.
    assert torch.equal(is_mask[:2] | is_mask[2:], answer[:2]) and not (is_mask[:2] & is_mask[2:]).any()
    assert torch.isfinite(loss)


def test_objectives_score_only_the_predicting_rows_and_keep_the_full_logits_loss(processor):
    """Issue 25 item 15: the LM head runs on the rows that predict supervised tokens, never on (batch, seq, vocab);
    the loss equals the one computed from full logits."""
    model = build_tiny_model(processor)
    batch = DimpleSFTCollator(processor, seed=2)([chat("red square"), chat("blue", (20, 30, 200))])
    head_shapes, noisy_ids = [], []
    model.lm_head.register_forward_hook(lambda module, args, output: head_shapes.append(tuple(output.shape)))
    model.register_forward_pre_hook(lambda module, args, kwargs: noisy_ids.append(kwargs["input_ids"]), with_kwargs=True)
    mask_id, vocab = model.config.mask_token_id, model.config.vocab_size
    for seed, complementary, weighting in ((0, False, False), (1, True, True), (2, False, True)):
        loss, _ = diffusion_objective(model, batch, mask_id, complementary=complementary, time_weighting=weighting,
                                      generator=torch.Generator().manual_seed(seed))
        noisy = noisy_ids[-1]
        masked = noisy == mask_id
        assert head_shapes[-1] == (int(masked.sum()), vocab)
        copies = 2 if complementary else 1
        t = sample_times(batch["input_ids"].shape[0], generator=torch.Generator().manual_seed(seed)).repeat(copies)
        rest = {key: value for key, value in batch.items() if key not in ("labels", "input_ids")}
        if complementary:
            rest = {key: torch.cat([value, value]) for key, value in rest.items()}
        with torch.no_grad():
            full = model(input_ids=noisy, **rest).logits
        assert full.shape == (*noisy.shape, vocab)
        clean = batch["input_ids"].repeat(copies, 1)
        assert torch.allclose(loss, diffusion_loss(full, clean, masked, t, weighting), rtol=1e-6, atol=1e-7)

    loss, _ = ar_objective(model, batch)
    labelled = batch["labels"] != IGNORE_INDEX
    assert head_shapes[-1] == (int(labelled[:, 1:].sum()), vocab)
    with torch.no_grad():
        assert torch.allclose(loss, model(**batch).loss, rtol=1e-6, atol=1e-7)


# --- attention modes ----------------------------------------------------------------------------------------


def test_attention_mode_switches_between_causal_and_bidirectional(processor):
    model = build_tiny_model(processor)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    changed = ids.clone()
    changed[0, -1] = 10
    model.set_attention_mode(causal=True)
    assert model.config.full_attn_mask is False and all(layer.self_attn.is_causal for layer in model.model.layers)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits[:, :-1], model(input_ids=changed).logits[:, :-1])
    model.set_attention_mode(causal=False)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits[:, :-1], model(input_ids=changed).logits[:, :-1])
    with pytest.raises(TypeError, match="True or False"):
        model.set_attention_mode("causal")


# --- Trainer, gradient checkpointing, LoRA ------------------------------------------------------------------


def overfit_batch() -> list[dict]:
    return [chat("red circle"), chat("blue", (20, 30, 200), "Which colour?"), chat("two", (30, 200, 30), "How many?")]


def training_args(tmp_path, steps: int, lr: float = 1e-2, **extra) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=3, learning_rate=lr,
        report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0, **extra,
    )


def test_trainer_lowers_the_loss_on_an_overfit_batch(processor, tmp_path):
    samples = overfit_batch()
    model = build_tiny_model(processor)
    collator = DimpleSFTCollator(processor, seed=0)
    batch = collator(samples)
    trainer = DimpleTrainer(model=model, args=training_args(tmp_path, 15), train_dataset=samples,
                            data_collator=DimpleSFTCollator(processor, seed=0), objective="ar")
    assert model.config.full_attn_mask is False
    with torch.no_grad():
        before = float(model(**batch).loss)
    trainer.train()
    with torch.no_grad():
        after = float(model.eval()(**batch).loss)
    assert after < 0.5 * before

    trainer = DimpleTrainer(model=model, args=training_args(tmp_path, 15), train_dataset=samples,
                            data_collator=DimpleSFTCollator(processor, seed=0), objective="diffusion",
                            complementary_masking=True)
    assert model.config.full_attn_mask is True

    def diffusion_eval() -> float:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return float(diffusion_objective(model, batch, model.config.mask_token_id, complementary=True,
                                             generator=generator)[0])

    before = diffusion_eval()
    trainer.train()
    assert diffusion_eval() < before
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 15
    with pytest.raises(ValueError, match="Unknown objective"):
        DimpleTrainer(model=model, args=training_args(tmp_path, 1), objective="mlm")


def test_gradient_checkpointing_recomputes_layers_and_keeps_gradients(processor, tmp_path):
    batch = DimpleSFTCollator(processor, seed=0)(overfit_batch())
    grads = []
    for checkpointing in (False, True):
        model = build_tiny_model(processor).train()
        if checkpointing:  # the new name on transformers >= 5.2x, the deprecated one before
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        calls = []  # the checkpoint wraps the layer's forward: pre-hooks inside it also see the backward replay
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *args: calls.append(1))
        loss, _ = diffusion_objective(model, batch, model.config.mask_token_id, generator=torch.Generator().manual_seed(0))
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)
        grads.append(model.model.layers[1].mlp.up_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)

    model = build_tiny_model(processor)
    name = "activation_checkpointing" if hasattr(TrainingArguments, "activation_checkpointing") else "gradient_checkpointing"
    args = training_args(tmp_path, 2, **{name: True})
    DimpleTrainer(model=model, args=args, train_dataset=overfit_batch(),
                  data_collator=DimpleSFTCollator(processor, seed=0), objective="diffusion").train()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)


def test_lora_adapters_attach_train_save_and_reload(processor, tmp_path):
    peft = pytest.importorskip("peft")
    samples = overfit_batch()
    batch = DimpleSFTCollator(processor, seed=0)(samples)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj")
    model = peft.get_peft_model(build_tiny_model(processor), config)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert len(trainable) == 2 * 4 * model.base_model.model.config.num_hidden_layers
    with torch.no_grad():
        base_logits = build_tiny_model(processor)(**batch).logits
        assert torch.allclose(model(**batch).logits, base_logits)  # LoRA B starts at zero
    DimpleTrainer(model=model, args=training_args(tmp_path / "run", 5), train_dataset=samples,
                  data_collator=DimpleSFTCollator(processor, seed=0), objective="diffusion").train()
    model.eval()
    with torch.no_grad():
        tuned = model(**batch).logits
    assert not torch.allclose(tuned, base_logits, atol=1e-4)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = peft.PeftModel.from_pretrained(build_tiny_model(processor), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, tuned, atol=1e-6)
    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, tuned, atol=1e-4)


# --- the bundled, trained tiny Dimple -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled():
    return DimpleModel.from_pretrained(BUNDLED_CHECKPOINT).eval(), DimpleProcessor.from_pretrained(BUNDLED_CHECKPOINT)


@pytest.mark.parametrize("index", [0, 1, 3, 11, 13])
def test_bundled_model_answers_held_out_examples_with_confident_decoding(bundled, index):
    """Test-split examples (never trained on): three one-word answers and two descriptions of 5-7 tokens."""
    model, processor = bundled
    sample = example(index, "test")
    inputs = processor.apply_chat_template(
        sample["messages"][:1], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    out = model.generate(**inputs, max_new_tokens=ANSWER_SLOTS, alg_p_threshold=0.95, return_dict_in_generate=True)
    answer = processor.post_process_image_text_to_text(out.sequences[:, inputs["input_ids"].shape[1] :])[0]
    assert answer == sample["answer"]
    answer_tokens = len(processor.tokenizer(answer, add_special_tokens=False).input_ids)
    # Confident decoding commits several tokens per pass: fewer passes than slots, and than words' tokens.
    assert out.num_forward_passes < ANSWER_SLOTS
    if answer_tokens >= 5:
        assert out.num_forward_passes < answer_tokens
