"""SanaTransformer built from ComfyUI-style `operations` (sana_core.operations), without ComfyUI: a stand-in
for comfy.ops.manual_cast (weights stored in one dtype, cast to the input's at each call, weight functions
applied on the fly) must give the plain model's result with the weights it computes with, although our fast
paths (Mix-FFN 1x1 convs as matmuls, the depthwise conv + GLU kernel) read weights directly. The same with
the real comfy.ops and a low-VRAM ModelPatcher: tests/comfy/test_operations.py."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import rel_err
from sana_core.operations import reads_weights_directly
from sana_core.runtime import Runtime
from sana_core.transformer import SanaConfig, SanaTransformer, random_state_dict

TINY = dict(depth=2, width=64, caption_dim=48, self_heads=2, cross_heads=2, mlp_hidden=160)
CONFIGS = {"sana-1.5": SanaConfig(**TINY, qk_norm=True), "sprint": SanaConfig(**TINY, qk_norm=True, sprint=True)}


class ManualCast:
    """What comfy.ops.manual_cast's layers do, as ComfyUI's own classes spell it: class-level flags, weight and
    bias cast to the input's device and dtype at each call, then the weight / bias functions applied."""

    class CastLayer:
        comfy_cast_weights = True
        weight_function = []
        bias_function = []

        def reset_parameters(self):  # no random init: the weights are loaded
            return None

        def cast(self, x):
            weight = self.weight.to(device=x.device, dtype=x.dtype)
            for f in self.weight_function:
                weight = f(weight)
            bias = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
            for f in self.bias_function if bias is not None else ():
                bias = f(bias)
            return weight, bias

    class Linear(CastLayer, nn.Linear):
        def forward(self, x):
            return F.linear(x, *self.cast(x))

    class Conv2d(CastLayer, nn.Conv2d):
        def forward(self, x):
            return self._conv_forward(x, *self.cast(x))


class NoCast(ManualCast):
    """comfy.ops.disable_weight_init with nothing to cast: the layers compute with their own weights."""

    class Linear(ManualCast.Linear):
        comfy_cast_weights = False

    class Conv2d(ManualCast.Conv2d):
        comfy_cast_weights = False


def inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 32, 3, 4, generator=g)
    context, mask = torch.randn(2, 7, cfg.caption_dim, generator=g), torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    kw = dict(guidance=torch.tensor([4.5, 3.0])) if cfg.sprint else {}
    return (x, torch.tensor([700.0, 300.0]), context, mask), kw


def plain(cfg, state):
    model = SanaTransformer(cfg)
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_manual_cast_from_a_storage_dtype_equals_the_plain_model(name):
    """Weights stored in float8 (plain adaLN tables and RMSNorm weights too), computed in float32: the plain
    float32 model holding the same float8-rounded weights. Every layer is called, none read directly."""
    cfg = CONFIGS[name]
    state = {k: v.to(torch.float8_e4m3fn) for k, v in random_state_dict(cfg, seed=1).items()}
    cast = SanaTransformer(cfg, dtype=torch.float8_e4m3fn, operations=ManualCast, compute_dtype=torch.float32)
    cast.load_state_dict(state)
    assert cast.dtype == torch.float32 and not reads_weights_directly(cast.blocks[0].mlp.depth_conv.conv)
    args, kw = inputs(cfg)
    ref = plain(cfg, {k: v.float() for k, v in state.items()})
    assert rel_err(cast(*args, **kw), ref(*args, **kw)) < 1e-5


def test_weight_functions_reach_the_directly_read_layers():
    """Weight patches applied on the fly (ComfyUI's low-VRAM LoRA path) on the Mix-FFN convolutions our fast
    path reads, and on a Linear: the plain model with the patched weights."""
    cfg = CONFIGS["sana-1.5"]
    state = random_state_dict(cfg, seed=2)
    model = SanaTransformer(cfg, operations=NoCast)
    model.load_state_dict(state)
    args, _ = inputs(cfg)
    assert torch.equal(model(*args), plain(cfg, state)(*args))  # nothing to cast: the direct path, same bits
    g = torch.Generator().manual_seed(3)
    patched = dict(state)
    for key in ("blocks.0.mlp.inverted_conv.conv.weight", "blocks.1.mlp.depth_conv.conv.bias",
                "blocks.1.mlp.point_conv.conv.weight", "blocks.0.attn.qkv.weight"):
        delta = 0.1 * torch.randn(state[key].shape, generator=g)
        patched[key] = state[key] + delta
        layer = model.get_submodule(key.rpartition(".")[0])
        functions = "weight_function" if key.endswith("weight") else "bias_function"
        setattr(layer, functions, [lambda w, d=delta: w + d])
    assert not reads_weights_directly(model.blocks[0].mlp.inverted_conv.conv)
    assert rel_err(model(*args), plain(cfg, patched)(*args)) < 1e-5


def test_graphs_stay_off_while_layers_patch_weights_on_the_fly():
    """A captured graph would bake in what the weight functions computed once: such a model runs eagerly."""
    cfg = CONFIGS["sana-1.5"]
    model = SanaTransformer(cfg, operations=NoCast)
    model.load_state_dict(random_state_dict(cfg, seed=2))
    model.blocks[1].attn.proj.weight_function = [lambda w: 2 * w]
    step = Runtime(cuda_graphs=True).graphed(lambda x: x, (), module=model, key="k", tokens=1)
    step(torch.zeros(1))
    assert "on the fly" in step.reason
