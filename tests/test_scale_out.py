"""Scale-out on CPU: `device_map="auto"` (accelerate, with disk offload splitting the decoder between whole layers)
and tensor parallelism over 2 processes (torchrun, gloo) with the declared `base_model_tp_plan`."""

import re
import subprocess
import sys
import textwrap

import pytest
import torch
from accelerate.utils import compute_module_sizes

from dimple import DimpleModel
from dimple.tiny.build import build_tiny_model, build_tiny_processor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved 4-layer tiny Dimple, its processor and image+text inputs."""
    folder = tmp_path_factory.mktemp("scale_out") / "model"
    processor = build_tiny_processor()
    model = build_tiny_model(processor, num_hidden_layers=4)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (64, 48), (200, 30, 30))},
                                             {"type": "text", "text": "What colour is the car in the image?"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return folder, model, dict(inputs)


def test_device_map_auto_loads_and_generates_like_a_plain_load(checkpoint, tmp_path):
    folder, model, inputs = checkpoint
    with torch.no_grad():
        expected_logits = model(**inputs).logits
        expected = model.generate(**inputs, max_new_tokens=8)

    on_cpu = DimpleModel.from_pretrained(folder, device_map="auto").eval()
    assert on_cpu.device.type == "cpu"
    with torch.no_grad():
        assert torch.equal(on_cpu.generate(**inputs, max_new_tokens=8), expected)

    # A CPU budget that fits everything before the second decoder layer forces the rest onto disk.
    sizes = compute_module_sizes(model)
    before_layer_1 = sum(sizes[name] for name in ("visual", "img_projector", "model.embed_tokens", "model.layers.0"))
    budget = before_layer_1 + sizes["model.layers.1"] + 1000  # accelerate keeps room for the largest layer
    split = DimpleModel.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path / "offload"
    ).eval()
    device_map = split.hf_device_map
    layer_devices = {name: device for name, device in device_map.items() if name.startswith("model.layers.")}
    assert all(re.fullmatch(r"model\.layers\.\d+", name) for name in layer_devices), device_map
    assert set(layer_devices.values()) == {"cpu", "disk"}, device_map
    with torch.no_grad():
        torch.testing.assert_close(split(**inputs).logits, expected_logits, atol=1e-6, rtol=0)
        assert torch.equal(split.generate(**inputs, max_new_tokens=8), expected)


TP_WORKER = """
import dataclasses, sys, torch, torch.distributed as dist
from transformers.distributed import DistributedConfig
from dimple import DimpleModel
folder, inputs_path, out_path = sys.argv[1:]
inputs = torch.load(inputs_path)
results = {}
ways = {"tp_plan": dict(tp_plan="auto")}
if "tp_size" in {field.name for field in dataclasses.fields(DistributedConfig)}:  # newer than transformers 5.12
    ways["distributed_config"] = dict(distributed_config=DistributedConfig(tp_size=2))
for name, options in ways.items():
    model = DimpleModel.from_pretrained(folder, **options).eval()
    q_proj = model.model.layers[0].self_attn.q_proj.weight  # a DTensor, or (transformers 5.12) the local shard
    local_rows = (q_proj.to_local() if hasattr(q_proj, "to_local") else q_proj).shape[0]
    assert local_rows * 2 == model.config.num_attention_heads * model.config.head_dim, (name, local_rows)
    with torch.no_grad():
        results[name] = dict(
            logits=model(**inputs).logits,
            cached=model.generate(**inputs, max_new_tokens=8),
            uncached=model.generate(**inputs, max_new_tokens=8, use_cache=False),
        )
if dist.get_rank() == 0:
    torch.save(results, out_path)
dist.destroy_process_group()
"""


def test_tensor_parallel_over_two_cpu_processes_matches_one_process(checkpoint, tmp_path):
    folder, model, inputs = checkpoint
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "worker.py").write_text(textwrap.dedent(TP_WORKER))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(tmp_path / "worker.py"), str(folder), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    with torch.no_grad():
        logits = model(**inputs).logits
        cached = model.generate(**inputs, max_new_tokens=8)
        uncached = model.generate(**inputs, max_new_tokens=8, use_cache=False)
    runs = torch.load(tmp_path / "out.pt")
    assert "tp_plan" in runs
    for name, parallel in runs.items():
        torch.testing.assert_close(parallel["logits"], logits, atol=1e-4, rtol=0, msg=name)
        assert torch.equal(parallel["cached"], cached), name
        assert torch.equal(parallel["uncached"], uncached), name
