"""The SANA ControlNet as ComfyUI's CONTROL_NET (nodes/controlnet.py), driven by the core Apply ControlNet
node: the hint image is encoded by the VAE and scaled by the latent format, as the library's encode_hint does;
start/end percent give the plain model outside the window; chained ControlNets all reach the model; what
get_control returns, prepared, is what the model's forward takes. Runs under ComfyUI's Python:

    PYTHONPATH=$COMFYUI_DIR:. $COMFYUI_PYTHON -m pytest tests/comfy/test_controlnet_node.py
"""
import dataclasses

import pytest
import torch

import nodes as core_nodes  # ComfyUI's (tests/comfy run in its folder; conftest.py loaded ComfyUI and the pack)
from sana_core import load_autoencoder  # noqa: E402
from sana_core.controlnet import ControlNet, Controls, encode_hint  # noqa: E402
from sana_core.demo import write_demo_autoencoder  # noqa: E402
from sana_core.transformer import SanaConfig, SanaTransformer, random_state_dict  # noqa: E402
from sana_nodes.controlnet import KEY, control_class, model_control  # noqa: E402

CFG = SanaConfig(depth=3, width=64, caption_dim=48, self_heads=2, cross_heads=2, mlp_hidden=160)
H, W = 64, 96  # image; latent 2 x 3


class VAE:
    """What Apply ControlNet needs of a VAE: ComfyUI's convention (encode takes (B, H, W, 3) in [0, 1] and
    returns the raw latent; the latent format scales it)."""

    def __init__(self, ae):
        self.ae = ae

    def spacial_compression_encode(self):
        return 32

    def encode(self, pixels):
        return self.ae.encode(pixels.movedim(-1, 1) * 2 - 1) / self.ae.scaling_factor


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    ae = load_autoencoder(write_demo_autoencoder(tmp_path_factory.mktemp("ae") / "ae.safetensors"),
                          dtype=torch.float32, device="cpu")
    base = SanaTransformer(CFG)
    base.load_state_dict(random_state_dict(CFG, seed=1))
    return ae, base.eval(), [random_controlnet("official", 2), random_controlnet("diffusers", 3)]


def random_controlnet(graph, seed):
    """Every weight random, the projections trained from zero included."""
    net = ControlNet(dataclasses.replace(CFG, depth=2), graph)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else
                    noise / p[0].numel() ** 0.5 if p.dim() > 1 else 0.1 * noise)
    return net.eval()


def apply(cnet, vae, image, strength, start, end, conds):
    positive, negative = conds
    return core_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, cnet, image, strength, start,
                                                                 end, vae=vae)


def conditioning():
    g = torch.Generator().manual_seed(0)
    return [[torch.randn(1, 7, CFG.caption_dim, generator=g), {}]], [[torch.randn(1, 7, CFG.caption_dim,
                                                                                  generator=g), {}]]


def test_apply_controlnet_window_hint_and_chain(parts):
    ae, base, (official, port) = parts
    vae = VAE(ae)
    g = torch.Generator().manual_seed(4)
    image, edges = torch.rand(1, H, W, 3, generator=g), torch.rand(1, H, W, 3, generator=g)
    positive, negative = apply(control_class()(official), vae, image, 0.8, 0.2, 0.6, conditioning())
    positive, negative = apply(control_class()(port), vae, edges, 0.5, 0.0, 1.0, (positive, negative))
    control = positive[0][1]["control"]
    assert negative[0][1]["control"] is not None
    control.pre_run(None, lambda percent: 1.0 - percent)  # sigma of a flow model with shift 1
    x = torch.randn(2, 32, H // 32, W // 32)  # uncond + cond
    returned = control.get_control(x, torch.tensor([0.5]), {}, 2, {})
    inside = returned[KEY]
    assert [(net, s) for net, _, s in inside] == [(official, 0.8), (port, 0.5)]
    for (_, hint, _), img in zip(inside, (image, edges)):
        want = encode_hint(ae, img.movedim(-1, 1), W, H)  # the library's hint: what the official pipeline makes
        assert hint.shape == (1, 32, H // 32, W // 32) and torch.allclose(hint, want, atol=1e-5)  # for the batch
    outside = control.get_control(x, torch.tensor([0.9]), {}, 2, {})[KEY]  # before start: only the second
    assert [net for net, _, _ in outside] == [port]
    first = control.previous_controlnet  # alone, outside its window: nothing, the model runs its plain path
    assert first.get_control(x, torch.tensor([0.9]), {}, 2, {}) is None  # before start
    assert first.get_control(x, torch.tensor([0.3]), {}, 2, {}) is None  # past end

    # what the model wrapper does with it: prepare for this call's caption, pass as control=
    context = torch.cat([c[0][0] for c in conditioning()][::-1])
    caption = base.encode_caption(context)
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        got = base(x, t, caption, control=model_control(returned, base, caption, context))
        want = base(x, t, caption, control=Controls(
            net.prepare(encode_hint(ae, img.movedim(-1, 1), W, H), base, caption, context, s)
            for net, img, s in ((official, image, 0.8), (port, edges, 0.5))))
        plain = base(x, t, caption)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, plain, atol=1e-3)
    assert model_control(None, base, caption, context) is None
    with pytest.raises(ValueError, match="another model family"):  # a core ControlNet's output on a SANA model
        model_control({"input": [], "middle": [], "output": [torch.zeros(1)]}, base, caption, context)


def test_a_vae_is_required(parts):
    _, _, (official, _) = parts
    positive, _ = apply(control_class()(official), None, torch.rand(1, H, W, 3), 1.0, 0.0, 1.0, conditioning())
    control = positive[0][1]["control"]
    control.pre_run(None, lambda percent: 1.0 - percent)
    with pytest.raises(ValueError, match="VAE input connected"):
        control.get_control(torch.randn(2, 32, 2, 3), torch.tensor([0.5]), {}, 2, {})
