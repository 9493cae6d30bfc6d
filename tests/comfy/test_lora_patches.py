"""nodes/lora.py's weight patches under ComfyUI's own ModelPatcher. Run with ComfyUI's Python (skipped
without ComfyUI), e.g. from the repository root:

    PYTHONPATH=/work/shared/comfyui:. /root/.cache/sana-comfyui-venv/bin/python -m pytest tests/comfy

A ModelPatcher around a SanaTransformer (at `diffusion_model.transformer`, where the core MODEL holds
it), patched with `lora_patches`, computes what the library's merge computes (float32, CPU); unpatching
restores the weights bit for bit; a LyCORIS LoHa (which only ComfyUI applies) lands on its slice of the
fused q/k/v."""
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfy.model_patcher import ModelPatcher  # ComfyUI and the pack are loaded by tests/comfy/conftest.py
from sana_core.demo import write_demo_lora  # noqa: E402
from sana_core.lora import apply_lora  # noqa: E402
from sana_core.transformer import SanaConfig, SanaTransformer, random_state_dict  # noqa: E402
from sana_nodes.lora import lora_patches  # noqa: E402
from comfy_test_helpers import rel_err  # noqa: E402

CFG = SanaConfig(depth=2, width=64, caption_dim=48, self_heads=2, cross_heads=2, mlp_hidden=160)
CPU = torch.device("cpu")


def tiny_model():
    model = SanaTransformer(CFG)
    model.load_state_dict(random_state_dict(CFG, seed=1))
    return model.eval().requires_grad_(False)


def run(model):
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 32, 3, 5, generator=g), torch.randn(2, 6, 48, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([730.0, 50.0]), context, torch.ones(2, 6))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A diffusers/PEFT LoRA with lora_alpha != rank in its metadata (ComfyUI's generic loader would miss
    the scale), a kohya / OneTrainer one on the Mix-FFN 1x1 conv, the caption projection and t_block, and
    a PEFT one with a lora_B bias."""
    tmp = tmp_path_factory.mktemp("loras")
    peft = write_demo_lora(tmp / "peft.safetensors", rank=4, alpha=6.0, seed=2)
    g = torch.Generator().manual_seed(3)
    kohya = {}
    for module, out, inp in (("transformer_blocks_0_ff_conv_inverted", 320, 64),
                             ("caption_projection_linear_1", 64, 48), ("time_embed_linear", 384, 64)):
        name = f"lora_transformer_{module}"
        shape = (1, 1) if "conv" in module else ()
        kohya[f"{name}.lora_down.weight"] = torch.randn(8, inp, *shape, generator=g) / inp ** 0.5
        kohya[f"{name}.lora_up.weight"] = 0.3 * torch.randn(out, 8, *shape, generator=g)
        kohya[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(kohya, tmp / "kohya.safetensors")
    bias = {}  # PEFT's lora_bias on the cross-attention v (a slice of the biased kv_linear)
    name = "transformer.transformer_blocks.1.attn2.to_v"
    bias[f"{name}.lora_A.weight"] = torch.randn(2, 64, generator=g) / 8
    bias[f"{name}.lora_B.weight"], bias[f"{name}.lora_B.bias"] = torch.randn(64, 2, generator=g), torch.randn(64)
    save_file(bias, tmp / "bias.safetensors", metadata={"lora_adapter_metadata": '{"transformer.lora_alpha": 3}'})
    return {"peft": peft, "kohya": tmp / "kohya.safetensors", "bias": tmp / "bias.safetensors"}


class BaseModelStandIn(torch.nn.Module):
    """What the core MODEL's BaseModel is to the patcher: the DiT at `diffusion_model.transformer`."""

    def __init__(self, dit):
        super().__init__()
        self.diffusion_model = torch.nn.Module()
        self.diffusion_model.transformer = dit


def patched(model, *loras):
    """A ModelPatcher around `model` (as a core MODEL holds it) with each (path, strength) added as
    patches, weights patched."""
    patcher = ModelPatcher(BaseModelStandIn(model), load_device=CPU, offload_device=CPU)
    for path, strength in loras:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        patches = lora_patches(Path(path).name, load_file(path), metadata, model)
        assert set(patcher.add_patches(patches, strength)) == set(patches)  # every patch found its weight
    patcher.patch_model(device_to=CPU)
    return patcher


def test_patches_equal_the_library_merge_and_unpatch_exactly(files):
    library, comfy_model = tiny_model(), tiny_model()
    plain = run(comfy_model)
    before = {k: v.clone() for k, v in comfy_model.state_dict().items()}
    loras = ((files["peft"], 0.7), (files["kohya"], -1.0), (files["bias"], 0.5))
    for path, strength in loras:
        apply_lora(library, path, strength)
    patcher = patched(comfy_model, *loras)
    assert rel_err(run(comfy_model), run(library)) < 1e-6
    assert rel_err(run(comfy_model), plain) > 1e-3
    patcher.unpatch_model(device_to=CPU)
    assert all(torch.equal(v, before[k]) for k, v in comfy_model.state_dict().items())


def test_a_loha_lands_on_its_slice_of_the_fused_qkv(tmp_path):
    g = torch.Generator().manual_seed(4)
    name = "lora_transformer_transformer_blocks_1_attn1_to_k"
    w = {f"{name}.hada_w1_a": torch.randn(64, 2, generator=g), f"{name}.hada_w1_b": torch.randn(2, 64, generator=g),
         f"{name}.hada_w2_a": torch.randn(64, 2, generator=g), f"{name}.hada_w2_b": torch.randn(2, 64, generator=g),
         f"{name}.alpha": torch.tensor(1.0)}
    save_file(w, tmp_path / "loha.safetensors")
    model = tiny_model()
    before = model.state_dict()["blocks.1.attn.qkv.weight"].clone()
    patcher = patched(model, (tmp_path / "loha.safetensors", 0.5))
    after = model.state_dict()["blocks.1.attn.qkv.weight"]
    delta = (w[f"{name}.hada_w1_a"] @ w[f"{name}.hada_w1_b"]) * (w[f"{name}.hada_w2_a"] @ w[f"{name}.hada_w2_b"])
    assert torch.equal(after[:64], before[:64]) and torch.equal(after[128:], before[128:])  # q and v untouched
    assert torch.allclose(after[64:128], before[64:128] + 0.5 * (1.0 / 2) * delta, atol=1e-5)
    patcher.unpatch_model(device_to=CPU)
    assert torch.equal(model.state_dict()["blocks.1.attn.qkv.weight"], before)

