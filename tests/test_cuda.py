"""GPU checks: attention backends and compiled steps agree with SDPA on CUDA. Skipped without a GPU."""

import warnings

import pytest
import torch
import transformers
from transformers import CompileConfig

from dimple.tiny.build import build_tiny_model
from prompts import encode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def padded_inputs(processor):
    return encode(processor, ["Hi.", "Tell me what the picture shows, in detail please."]).to("cuda")


def cuda_model(processor, attn_implementation: str, dtype: torch.dtype):
    model = build_tiny_model(processor).to("cuda", dtype)
    model.set_attn_implementation(attn_implementation)
    return model


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_float32_backends_give_the_same_tokens_on_cuda(processor, padded_inputs, attn_implementation):
    reference = cuda_model(processor, "sdpa", torch.float32).generate(**padded_inputs, max_new_tokens=12)
    model = cuda_model(processor, attn_implementation, torch.float32)
    assert torch.equal(model.generate(**padded_inputs, max_new_tokens=12), reference)


def flash_attention_installed(version: int) -> bool:
    """transformers' own check; versions older than 5.23 have no flash-attention 4 check at all."""
    return getattr(transformers.utils, f"is_flash_attn_{version}_available", lambda: False)()


@pytest.mark.parametrize("version", [2, 3, 4])
def test_flash_attention_matches_sdpa_on_a_padded_batch(processor, padded_inputs, version):
    """Padded rows go through flash attention's variable-length path; real positions must match SDPA."""
    if not flash_attention_installed(version):
        pytest.skip(f"flash-attention {version} is not installed")
    sdpa = cuda_model(processor, "sdpa", torch.bfloat16)
    flash = cuda_model(processor, f"flash_attention_{version}", torch.bfloat16)
    real = padded_inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = sdpa(**padded_inputs).logits[real].float()
        got = flash(**padded_inputs).logits[real].float()
    torch.testing.assert_close(got, expected, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_steps_give_the_same_tokens_on_cuda(processor, padded_inputs, mode):
    model = cuda_model(processor, "sdpa", torch.float32)
    unpadded = {key: value[1:] for key, value in padded_inputs.items()}
    eager = model.generate(**unpadded, max_new_tokens=16, alg_p_threshold=0.3)
    settings = dict(max_new_tokens=16, alg_p_threshold=0.3, compile_forward=True, compile_config=CompileConfig(mode=mode))
    model.generate(**unpadded, **settings)
    assert torch.equal(model.generate(**unpadded, **settings), eager)


@pytest.mark.parametrize("block_length", [None, 4], ids=["prefix-cache", "dual-cache"])
def test_reduce_overhead_replays_cached_steps_as_cuda_graphs(processor, padded_inputs, block_length):
    """No step is skipped by CUDA graphs: windows write only into the cache's static buffers and the passes that
    fill the cache run eagerly."""
    from torch._dynamo.utils import counters

    model = cuda_model(processor, "sdpa", torch.float32)
    unpadded = {key: value[1:] for key, value in padded_inputs.items()}
    settings = dict(max_new_tokens=16, alg_p_threshold=0.3, block_length=block_length, compile_forward=True,
                    compile_config=CompileConfig(mode="reduce-overhead"))
    counters.clear()
    for _ in range(2):
        model.generate(**unpadded, **settings)
    assert counters["inductor"]["cudagraph_skips"] == 0


def test_one_host_synchronisation_per_step_on_cuda(processor, padded_inputs):
    """The sampler reads one number per step (masks left) and one per block; nothing else waits for the GPU."""
    model = cuda_model(processor, "sdpa", torch.float32)
    model.generate(**padded_inputs, max_new_tokens=12, alg_p_threshold=0.3)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = model.generate(**padded_inputs, max_new_tokens=12, alg_p_threshold=0.3, return_dict_in_generate=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    # per request: padding check, M-RoPE ids, validation; per block: one; per step: one
    assert len(syncs) <= out.num_forward_passes + 1 + 8
