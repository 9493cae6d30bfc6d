"""Low VRAM under ComfyUI's own memory manager (real ModelPatcher, on the CPU): the SANA MODEL loaded partially
or whole computes what the patched model computes, for every weight a patch (a LoRA) touches: the adaLN tables
that sit beside child layers (blocks.N.scale_shift_table, which ModelPatcher's loads skip: comfy_family.
load_plain_parameters patches them), RMSNorm weights, and the layers of a quantized (GGUF Q8_0, fp8) file, which
stay quantized where ComfyUI leaves them on the CPU and are dequantized, then patched (ComfyUI's LowVramPatch
through the layer's convert_weight / set_weight). Unpatching gives the stored weights back bit for bit.

    cd $COMFYUI_DIR && PYTHONPATH=$COMFYUI_DIR:<repo> COMFYUI_DIR=$COMFYUI_DIR CUDA_VISIBLE_DEVICES= \
        $COMFYUI_PYTHON -m pytest -q <repo>/tests/comfy/test_low_vram_patches.py
"""
import pytest
import torch
from safetensors.torch import save_file

import comfy.model_management  # ComfyUI and the pack are loaded by tests/comfy/conftest.py
import comfy.ops
from sana_core.quantized import quantization_summary
from sana_core.quantized_files import quantize_checkpoint
from sana_core.transformer import SanaConfig, SanaTransformer, config_metadata, load_transformer, random_state_dict
from sana_nodes import comfy_family, host
from comfy_test_helpers import rel_err

CFG = SanaConfig(depth=2, width=64, caption_dim=48, self_heads=2, cross_heads=2, mlp_hidden=160, qk_norm=True)
CPU = torch.device("cpu")
PATCHED = ("blocks.0.scale_shift_table", "blocks.1.scale_shift_table", "final_layer.scale_shift_table",
           "blocks.1.attn.q_norm.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.inverted_conv.conv.weight",
           "blocks.1.mlp.point_conv.conv.weight", "blocks.1.cross_attn.kv_linear.weight")
PREFIX = "diffusion_model.transformer."  # where the core MODEL holds the DiT


def inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 32, 3, 4, generator=g), torch.tensor([700.0, 300.0]),
            torch.randn(2, 7, CFG.caption_dim, generator=g), torch.tensor([[1] * 7, [1] * 4 + [0] * 3]))


def plain(state):
    model = SanaTransformer(CFG)
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("low_vram")
    state = random_state_dict(CFG, seed=1)
    save_file(state, str(d / "tiny.safetensors"), metadata=config_metadata(CFG))
    quantize_checkpoint(d / "tiny.safetensors", d / "tiny_q8_0.gguf", "q8_0")
    quantize_checkpoint(d / "tiny.safetensors", d / "tiny_fp8.safetensors", "fp8")
    return d


def patcher_for(path):
    dit = load_transformer(path, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    managed = host.ManagedModel(host.current(), "transformer", dit.eval().requires_grad_(False), path,
                                load_device=CPU, offload_device=CPU)
    return dit, comfy_family.model_patcher(managed)


def dequantized(dit) -> dict:
    """The weights the model computes with (quantized layers dequantized), by original name."""
    out = {k: v for k, v in dit.state_dict().items() if not k.endswith(("scale_weight", "scale_input"))}
    for name, module in dit.named_modules():
        if getattr(module, "qtype", None):
            out[name + ".weight"] = module.dequantized_weight(torch.float32, CPU)
    return out


@pytest.mark.parametrize("name", ["tiny.safetensors", "tiny_q8_0.gguf", "tiny_fp8.safetensors"])
@pytest.mark.parametrize("partial", [True, False])
def test_every_patched_weight_is_applied_partially_or_fully_loaded(files, name, partial):
    dit, patcher = patcher_for(files / name)
    weights = dequantized(dit)
    stored = {k: v.clone() for k, v in dit.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    diffs = {k: 0.1 * torch.randn(weights[k].shape, generator=g) for k in PATCHED}
    patcher = patcher.clone()  # as a LoRA node does: the callback travels with the clone
    assert len(patcher.add_patches({PREFIX + k: (d,) for k, d in diffs.items()})) == len(PATCHED)
    layers = sorted((comfy.model_management.module_size(m) for m in dit.modules() if hasattr(m, "comfy_cast_weights")),
                    reverse=True)
    patcher.patch_model(device_to=CPU, lowvram_model_memory=layers[0] + 1 if partial else 0)
    on_the_fly = [k for k in PATCHED if getattr(dit.get_submodule(k.rpartition(".")[0]), "weight_function", None)]
    assert patcher.model.model_lowvram == partial and bool(on_the_fly) == partial
    expected = plain({k: v + diffs[k] if k in diffs else v for k, v in weights.items()})
    assert rel_err(dit(*inputs()), expected(*inputs())) < 1e-5
    if name != "tiny.safetensors":  # the layers ComfyUI left on the CPU stay quantized, patched at each call
        assert quantization_summary(dit) and all(dit.get_submodule(k.rpartition(".")[0]).stored() for k in on_the_fly)

    patcher.unpatch_model(CPU)
    assert all(torch.equal(v, stored[k]) for k, v in dit.state_dict().items())  # the stored form, bit for bit
    assert rel_err(dit(*inputs()), plain(weights)(*inputs())) < 1e-6
