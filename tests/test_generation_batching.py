"""Batching never changes an answer: each row of a left-padded batch, with images or in block decoding, equals
its prompt decoded alone, and `num_return_sequences` gives that many rows per prompt."""

import torch

from prompts import encode, picture


def test_padded_batch_with_images_equals_each_prompt_alone(model, processor):
    prompts = [
        ("What colour is the car in the image?", [picture(84, 56, 1)]),
        "Hi.",
        ("Compare the two pictures please.", [picture(56, 56, 2), picture(112, 56, 3)]),
    ]
    batch = encode(processor, prompts)
    assert (batch["attention_mask"][:, 0] == 0).any()
    for use_cache in (True, False):
        out = model.generate(**batch, max_new_tokens=10, use_cache=use_cache, alg_p_threshold=0.3)
        for row, prompt in enumerate(prompts):
            alone = encode(processor, [prompt])
            solo = model.generate(**alone, max_new_tokens=10, use_cache=use_cache, alg_p_threshold=0.3)
            assert torch.equal(out[row, -10:], solo[0, -10:])


def test_block_decoding_rows_equal_their_prompts_alone(model, processor):
    prompts = [("Hi.", [picture(84, 56)]), ("Tell me everything you can see in this picture.", [picture(84, 56)])]
    batch = encode(processor, prompts)
    settings = dict(max_new_tokens=10, block_length=4, alg_p_threshold=0.3)
    together = model.generate(**batch, **settings)
    for row, prompt in enumerate(prompts):
        alone = encode(processor, [prompt])
        solo = model.generate(**alone, **settings)
        assert torch.equal(together[row, batch["input_ids"].shape[1] :], solo[0, alone["input_ids"].shape[1] :])


def test_num_return_sequences_with_images(model, processor):
    inputs = encode(processor, [("Describe it.", [picture(56, 56, 4)])])
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=6, num_return_sequences=3, temperature=1.0, do_sample=True)
    assert out.shape[0] == 3
