"""SanaTransformer built from the real comfy.ops, loaded by a real ModelPatcher, on the CPU. Runs under
ComfyUI's Python with ComfyUI and this repository importable:

    PYTHONPATH=$COMFYUI_DIR:. $COMFYUI_PYTHON -m pytest tests/comfy

A low-VRAM partial load leaves layers to ComfyUI's cast path (comfy_cast_weights) and applies the weight
patches of those layers on the fly (weight_function), while the layers it loads get theirs patched in place:
the result must be the plain model's with the patched weights, including where our fast paths read weights
themselves (Mix-FFN convolutions, the depthwise conv + GLU kernel). Patching a loaded model changes the
fingerprint its CUDA graphs are keyed by."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

comfy_args = pytest.importorskip("comfy.cli_args").args
comfy_args.cpu = True  # before comfy.model_management is imported: no GPU probing
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.ops  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
if "sana_core.kernels" not in sys.modules:  # load the pack the way ComfyUI does: its __init__ registers kernels/
    spec = importlib.util.spec_from_file_location("sana_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    sys.modules["sana_pack"] = pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)

from sana_core.operations import reads_weights_directly  # noqa: E402
from sana_core.runtime import fingerprint  # noqa: E402
from sana_core.transformer import SanaConfig, SanaTransformer, random_state_dict  # noqa: E402
from comfy_test_helpers import rel_err  # noqa: E402

CFG = SanaConfig(depth=2, width=64, caption_dim=48, self_heads=2, cross_heads=2, mlp_hidden=160, qk_norm=True)
CPU = torch.device("cpu")
PATCHED = ("blocks.0.mlp.inverted_conv.conv.weight", "blocks.0.mlp.depth_conv.conv.weight",
           "blocks.1.mlp.inverted_conv.conv.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.point_conv.conv.weight")


class Holder(torch.nn.Module):
    """What a ModelPatcher manages (as comfy.model_base.BaseModel): the DiT under `diffusion_model`."""

    def __init__(self, dit):
        super().__init__()
        self.diffusion_model = dit


def build(operations, state):
    dit = SanaTransformer(CFG, operations=operations)
    dit.load_state_dict(state)
    return dit.eval().requires_grad_(False)


def inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 32, 3, 4, generator=g), torch.tensor([700.0, 300.0]),
            torch.randn(2, 7, CFG.caption_dim, generator=g), torch.tensor([[1] * 7, [1] * 4 + [0] * 3]))


@pytest.mark.parametrize("operations", [comfy.ops.disable_weight_init, comfy.ops.manual_cast])
def test_comfy_operations_build_the_same_model(operations):
    state = random_state_dict(CFG, seed=1)
    dit, ref = build(operations, state), build(None, state)
    assert isinstance(dit.blocks[0].mlp.depth_conv.conv, operations.Conv2d)
    assert reads_weights_directly(dit.blocks[0].mlp.depth_conv.conv) == (operations is comfy.ops.disable_weight_init)
    assert rel_err(dit(*inputs()), ref(*inputs())) < 1e-6


def test_low_vram_partial_load_with_weight_patches_equals_the_patched_model():
    state = random_state_dict(CFG, seed=1)
    dit = build(comfy.ops.disable_weight_init, state)
    patcher = comfy.model_patcher.ModelPatcher(Holder(dit), load_device=CPU, offload_device=CPU)
    g = torch.Generator().manual_seed(2)
    diffs = {key: 0.1 * torch.randn(state[key].shape, generator=g) for key in PATCHED}
    assert len(patcher.add_patches({f"diffusion_model.{k}": (d,) for k, d in diffs.items()})) == len(PATCHED)
    sizes = sorted((comfy.model_management.module_size(m) for m in dit.modules() if hasattr(m, "comfy_cast_weights")),
                   reverse=True)
    patcher.patch_model(device_to=CPU, lowvram_model_memory=sizes[0] + sizes[1] + 1)  # 2 layers loaded, the rest not

    on_the_fly = [k for k in PATCHED if dit.get_submodule(k.rpartition(".")[0]).weight_function]
    assert patcher.model.model_lowvram and 0 < len(on_the_fly) < len(PATCHED)  # both kinds of patched layer
    assert not reads_weights_directly(dit.blocks[0].mlp.inverted_conv.conv)
    expected = build(None, {k: v + diffs[k] if k in diffs else v for k, v in state.items()})
    assert rel_err(dit(*inputs()), expected(*inputs())) < 1e-5

    patcher.unpatch_model(CPU)  # patches gone, casting off: the unpatched model again
    assert reads_weights_directly(dit.blocks[0].mlp.inverted_conv.conv)
    assert rel_err(dit(*inputs()), build(None, state)(*inputs())) < 1e-6


def test_patching_a_loaded_model_changes_what_its_graphs_are_keyed_by():
    """A ModelPatcher patches a fully loaded model's weights by swapping in new tensors: the fingerprint a
    captured graph was taken with no longer matches, so the graph is dropped and captured again."""
    state = random_state_dict(CFG, seed=1)
    dit = build(comfy.ops.disable_weight_init, state)
    patcher = comfy.model_patcher.ModelPatcher(Holder(dit), load_device=CPU, offload_device=CPU)
    before = fingerprint(dit)
    key = "blocks.0.attn.qkv.weight"
    patcher.add_patches({f"diffusion_model.{key}": (torch.ones_like(state[key]),)})
    patcher.patch_model(device_to=CPU)
    assert fingerprint(dit) != before and reads_weights_directly(dit.blocks[0].attn.qkv)
    patched = fingerprint(dit)
    patcher.unpatch_model(CPU)
    assert fingerprint(dit) != patched
