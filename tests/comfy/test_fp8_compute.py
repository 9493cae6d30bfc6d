"""fp8 compute (sana_core.fp8) under ComfyUI's ModelPatcher, on the CPU (so the fallback: fp8 weights, float
compute): LoRA-style weight patches go through Fp8Linear's convert_weight / set_weight (ComfyUI's protocol for
scaled fp8 layers), full and low-VRAM loads compute the patched model within fp8's error, and unpatching gives
the fp8 weights back bit for bit. Run with ComfyUI's Python, e.g. from the repository root:

    PYTHONPATH=/work/shared/comfyui:. /root/.cache/sana-comfyui-venv/bin/python -m pytest tests/comfy"""
import comfy.model_patcher  # ComfyUI and the pack are loaded by tests/comfy/conftest.py
import comfy.ops
import pytest
import torch

from sana_core import fp8
from sana_core.transformer import SanaConfig, SanaTransformer, random_state_dict
from comfy_test_helpers import rel_err

CFG = SanaConfig(depth=2, width=64, caption_dim=48, self_heads=2, cross_heads=2, mlp_hidden=160, qk_norm=True)
CPU = torch.device("cpu")
PATCHED = ("blocks.0.attn.qkv.weight", "blocks.1.mlp.inverted_conv.conv.weight", "blocks.1.mlp.point_conv.conv.weight")


class Holder(torch.nn.Module):
    """What a ModelPatcher manages (as comfy.model_base.BaseModel): the DiT under `diffusion_model`."""

    def __init__(self, dit):
        super().__init__()
        self.diffusion_model = dit


def build(state, operations=None):
    dit = SanaTransformer(CFG, operations=operations)
    dit.load_state_dict(state)
    return dit.eval().requires_grad_(False)


def run(dit):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return dit(torch.randn(2, 32, 3, 4, generator=g), torch.tensor([700.0, 300.0]),
                   torch.randn(2, 7, CFG.caption_dim, generator=g), torch.tensor([[1] * 7, [1] * 4 + [0] * 3]))


@pytest.mark.parametrize("low_vram", [False, True])
def test_weight_patches_on_fp8_layers(low_vram):
    state = random_state_dict(CFG, seed=1)
    dit = fp8.use_fp8_compute(build(state, comfy.ops.disable_weight_init))
    originals = {k: dit.get_parameter(k).clone() for k in PATCHED}
    patcher = comfy.model_patcher.ModelPatcher(Holder(dit), load_device=CPU, offload_device=CPU)
    g = torch.Generator().manual_seed(2)
    diffs = {key: 0.02 * torch.randn(state[key].shape, generator=g) for key in PATCHED}
    assert len(patcher.add_patches({f"diffusion_model.{k}": (d,) for k, d in diffs.items()})) == len(PATCHED)
    patcher.patch_model(device_to=CPU, lowvram_model_memory=1 if low_vram else 0)

    patched = build({k: v + diffs[k] if k in diffs else v for k, v in state.items()})
    assert isinstance(dit.blocks[0].attn.qkv, fp8.Fp8Linear)
    assert all(dit.get_parameter(k).dtype == torch.float8_e4m3fn for k in PATCHED)
    assert [dit.get_submodule(k.rpartition(".")[0]).weight_function != [] for k in PATCHED] == [low_vram] * 3
    for k in PATCHED:  # the weights computed with: the patched ones within two e4m3 roundings (at conversion, patched)
        weight = dit.get_submodule(k.rpartition(".")[0]).dequantized_weight(torch.float32, CPU)
        assert rel_err(weight, state[k] + diffs[k]) < 0.06 and rel_err(weight, state[k]) > 0.1, k
    assert rel_err(run(dit), run(patched)) < 0.05

    patcher.unpatch_model(CPU)
    assert all(torch.equal(dit.get_parameter(k).view(torch.uint8), originals[k].view(torch.uint8)) for k in PATCHED)
