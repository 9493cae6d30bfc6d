"""The Linear DiT equals diffusers' SanaTransformer2DModel (the oracle) for every variant family,
loaded from every published file layout; PAG, half precision and the full-size parameter counts.

Original-format fixtures are converted to diffusers names by diffusers' own converter
(`convert_sana_transformer_to_diffusers`), so that our name map is checked against an
independent one, not against itself."""
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import rel_err
from sana_core.transformer import (CONFIGS, SanaConfig, SanaTransformer, config_metadata, detect_config,
                                   load_transformer, random_state_dict)

diffusers = pytest.importorskip("diffusers")
from diffusers import SanaTransformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_sana_transformer_to_diffusers  # noqa: E402

TINY = dict(depth=2, width=64, caption_dim=48, self_heads=2, cross_heads=2, mlp_hidden=160)
VARIANTS = {
    "sana-1.0": SanaConfig(**TINY),
    "sana-1.5-qk-norm": SanaConfig(**TINY, qk_norm=True),
    "sprint": SanaConfig(**TINY, qk_norm=True, sprint=True),
    "pe-2k-style": SanaConfig(**TINY, pe_interpolation=1.0, base_size=4),
    "pe-4k-style": SanaConfig(**TINY, pe_interpolation=2.0, base_size=8),
}
FORMATS = ("pth", "safetensors", "comfyui", "diffusers-folder", "diffusers-sharded", "diffusers-single")


def diffusers_model(cfg: SanaConfig, **kw) -> SanaTransformer2DModel:
    return SanaTransformer2DModel(
        in_channels=32, out_channels=32, num_layers=cfg.depth, num_attention_heads=cfg.self_heads,
        attention_head_dim=cfg.width // cfg.self_heads, num_cross_attention_heads=cfg.cross_heads,
        cross_attention_head_dim=cfg.width // cfg.cross_heads, cross_attention_dim=cfg.width,
        caption_channels=cfg.caption_dim, mlp_ratio=cfg.mlp_hidden / cfg.width,
        sample_size=cfg.base_size or 32, interpolation_scale=cfg.pe_interpolation, guidance_embeds=cfg.sprint,
        qk_norm="rms_norm_across_heads" if cfg.qk_norm else None, **kw)


def original_checkpoint(cfg: SanaConfig, seed=0) -> dict:
    """Random original-named weights plus the stale extras real files carry."""
    sd = random_state_dict(cfg, seed=seed)
    sd["pos_embed"] = torch.randn(1, 16, cfg.width)  # stale buffer of a 128 px grid: must be ignored
    sd["y_embedder.y_embedding"] = torch.randn(300, cfg.caption_dim)
    if cfg.sprint:
        sd["logvar_linear.weight"], sd["logvar_linear.bias"] = torch.randn(1, cfg.width), torch.randn(1)
    return sd


def to_diffusers(sd: dict, cfg: SanaConfig) -> dict:
    """diffusers' converter, plus the names it does not know (q/k norm, Sprint embedders)."""
    sd = dict(sd)
    out = convert_sana_transformer_to_diffusers(sd)
    for i in range(cfg.depth):
        for ours, theirs in (("attn", "attn1"), ("cross_attn", "attn2")):
            for n, m in (("q_norm", "norm_q"), ("k_norm", "norm_k")):
                if f"blocks.{i}.{ours}.{n}.weight" in sd:
                    out[f"transformer_blocks.{i}.{theirs}.{m}.weight"] = sd.pop(f"blocks.{i}.{ours}.{n}.weight")
    if cfg.sprint:
        for j, d in ((0, 1), (2, 2)):
            for s in ("weight", "bias"):
                out[f"time_embed.guidance_embedder.linear_{d}.{s}"] = sd.pop(f"cfg_embedder.mlp.{j}.{s}")
                out[f"time_embed.timestep_embedder.linear_{d}.{s}"] = out.pop(
                    f"time_embed.emb.timestep_embedder.linear_{d}.{s}")
        sd = {k: v for k, v in sd.items() if not k.startswith("logvar_linear.")}
    assert not sd, f"names the test's converter left over: {list(sd)}"
    return out


def write(fmt: str, folder, cfg: SanaConfig, sd: dict, ref: SanaTransformer2DModel):
    """Write the weights in one layout; returns (path, hints the layout cannot carry)."""
    meta = config_metadata(cfg)
    hints = {"cross_heads": cfg.cross_heads, "pe_interpolation": cfg.pe_interpolation, "base_size": cfg.base_size}
    if fmt == "pth":
        path = folder / "sana.pth"
        torch.save({"state_dict": sd, "epoch": torch.tensor(3)}, path)
        return path, hints
    if fmt == "safetensors":
        save_file(sd, folder / "sana.safetensors", metadata=meta)
        return folder / "sana.safetensors", {}
    if fmt == "comfyui":
        save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, folder / "sana_comfy.safetensors",
                  metadata=meta)
        return folder / "sana_comfy.safetensors", {}
    if fmt == "diffusers-folder":
        ref.save_pretrained(folder / "transformer")
        return folder / "transformer", {}
    if fmt == "diffusers-sharded":
        ref.save_pretrained(folder / "sharded", max_shard_size="50KB")
        assert (folder / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
        return folder / "sharded", {}
    if fmt == "diffusers-single":  # the config as diffusers writes it, in the metadata
        save_file(ref.state_dict(), folder / "sana_diffusers.safetensors",
                  metadata={"config": json.dumps(dict(ref.config))})
        return folder / "sana_diffusers.safetensors", {}
    raise AssertionError(fmt)


def inputs(cfg: SanaConfig, batch=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 32, 3, 5, generator=g)  # non-square latent
    context = torch.randn(batch, 7, cfg.caption_dim, generator=g)
    mask = torch.ones(batch, 7, dtype=torch.long)
    mask[1, 3:] = 0  # padded caption
    return x, context, mask


def both(model, ref, cfg, x, context, mask, timesteps=(730, 50), guidance=(4.5, 3.0), **kw):
    """Our velocity and diffusers', each called with its own conventions: ours takes t * 1000 and the
    raw guidance; diffusers' Sprint transformer takes t in [0, 1] and guidance * 0.1 (its pipeline
    scales them), its other models the t * 1000 timesteps."""
    t = torch.tensor(timesteps, dtype=torch.float32)
    with torch.no_grad():
        if cfg.sprint:
            g = torch.tensor(guidance)
            ours = model(x, t, context, mask, guidance=g, **kw)
            theirs = ref(x, context, timestep=t / 1000, guidance=g * 0.1, encoder_attention_mask=mask).sample
        else:
            ours = model(x, t, context, mask, **kw)
            theirs = ref(x, context, timestep=torch.tensor(timesteps), encoder_attention_mask=mask).sample
    return ours, theirs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Per variant: the diffusers oracle and the same weights written in every layout."""
    out = {}
    for name, cfg in VARIANTS.items():
        sd = original_checkpoint(cfg, seed=len(out))
        ref = diffusers_model(cfg).eval()
        ref.load_state_dict(to_diffusers(sd, cfg), strict=True)
        folder = tmp_path_factory.mktemp(name)
        out[name] = cfg, ref, {fmt: write(fmt, folder, cfg, sd, ref) for fmt in FORMATS}
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_equals_diffusers_in_every_format(files, variant, fmt):
    cfg, ref, paths = files[variant]
    path, hints = paths[fmt]
    model = load_transformer(path, dtype=torch.float32, device="cpu", **hints)
    assert model.config == cfg  # structure detected from the tensors, heads/PE from metadata or hints
    ours, theirs = both(model, ref, cfg, *inputs(cfg))
    assert ours.shape == theirs.shape == (2, 32, 3, 5) and ours.dtype == torch.float32
    assert theirs.std() > 0.1  # a meaningful output, not a zero-initialised layer
    assert rel_err(ours, theirs) < 1e-4


def test_padding_is_masked_and_timestep_matters(files):
    """Guards against a comparison that passes because the mask or timestep is ignored by both."""
    cfg, ref, paths = files["sana-1.0"]
    model = load_transformer(paths["safetensors"][0], dtype=torch.float32, device="cpu")
    x, context, mask = inputs(cfg)
    base, _ = both(model, ref, cfg, x, context, mask)
    changed = context.clone()
    changed[1, 3:] += 5.0  # only padded positions of sample 1
    same, _ = both(model, ref, cfg, x, changed, mask)
    assert rel_err(same, base) < 1e-6
    changed[0, 3:] += 5.0  # real positions of sample 0
    moved, _ = both(model, ref, cfg, x, changed, mask)
    assert rel_err(moved[0], base[0]) > 1e-3
    later, _ = both(model, ref, cfg, x, context, mask, timesteps=(731, 50))
    assert rel_err(later[0], base[0]) > 1e-5 and rel_err(later[1], base[1]) < 1e-7


def test_sprint_guidance_is_embedded(files):
    cfg, ref, paths = files["sprint"]
    model = load_transformer(paths["safetensors"][0], dtype=torch.float32, device="cpu")
    a, _ = both(model, ref, cfg, *inputs(cfg), guidance=(4.5, 3.0))
    b, theirs = both(model, ref, cfg, *inputs(cfg), guidance=(6.0, 3.0))
    assert rel_err(b[0], a[0]) > 1e-3 and rel_err(b[1], a[1]) < 1e-7
    assert rel_err(b, theirs) < 1e-4


def test_position_embedding_follows_the_grid(files):
    """2K/4K models: the sin-cos embedding is computed for the actual grid, any aspect ratio."""
    cfg, ref, paths = files["pe-4k-style"]
    model = load_transformer(paths["safetensors"][0], dtype=torch.float32, device="cpu")
    for h, w in ((5, 3), (8, 8), (2, 11)):
        x = torch.randn(2, 32, h, w)
        _, context, mask = inputs(cfg)
        ours, theirs = both(model, ref, cfg, x, context, mask)
        assert rel_err(ours, theirs) < 1e-4
    plain = load_transformer(paths["safetensors"][0], dtype=torch.float32, device="cpu", pe_interpolation=None)
    assert rel_err(both(plain, ref, cfg, *inputs(cfg))[0], both(model, ref, cfg, *inputs(cfg))[0]) > 1e-2


def test_pag_identity_attention_equals_diffusers(files):
    """perturbed samples: self-attention replaced by proj(V) in the chosen blocks, like diffusers'
    PAGIdentitySanaLinearAttnProcessor2_0 (which expects the batch as [normal..., perturbed...])."""
    from diffusers.models.attention_processor import PAGIdentitySanaLinearAttnProcessor2_0

    cfg, ref, paths = files["sana-1.0"]
    model = load_transformer(paths["safetensors"][0], dtype=torch.float32, device="cpu")
    x, context, mask = (torch.cat([t, t]) for t in inputs(cfg))
    perturbed = torch.tensor([False, False, True, True])
    layers = (1,)
    processors = {name: proc for name, proc in ref.attn_processors.items()}
    ref.set_attn_processor({name: PAGIdentitySanaLinearAttnProcessor2_0() if name.startswith("transformer_blocks.1.attn1")
                            else proc for name, proc in processors.items()})
    try:
        ours, theirs = both(model, ref, cfg, x, context, mask, timesteps=(730, 50, 730, 50),
                            perturbed=perturbed, perturbed_layers=layers)
    finally:
        ref.set_attn_processor(processors)
    assert rel_err(ours, theirs) < 1e-4
    assert rel_err(ours[2:], ours[:2]) > 1e-3  # the perturbation changed the perturbed half only
    plain, _ = both(model, ref, cfg, *inputs(cfg))
    assert rel_err(ours[:2], plain) < 1e-6


def test_linear_attention_sums_are_float32_in_half_precision():
    """4096 tokens with |q|, |k| ~ 30: the sums overflow fp16 (a naive fp16 K^T V is inf), ours stay
    finite and equal the float64 result to fp16 precision."""
    from sana_core.kernels import linear_attention  # what the model calls (the PyTorch twin on the CPU)

    g = torch.Generator().manual_seed(0)
    q, k, v = (30 * torch.randn(1, 4096, 64, generator=g) for _ in range(3))
    ref = linear_attention(q.double(), k.double(), v.double())
    naive = k.half().relu().transpose(1, 2) @ v.half()  # what fp16 sums do
    assert torch.isinf(naive).any()
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        out = linear_attention(q.to(dtype), k.to(dtype), v.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert rel_err(out, ref) < tol


def test_half_precision_model_stays_finite_on_large_activations():
    """fp16 and bf16 models with large attention and FFN activations: finite, close to fp32."""
    cfg = SanaConfig(**TINY)
    sd = random_state_dict(cfg, seed=3)
    for i in range(cfg.depth):
        sd[f"blocks.{i}.attn.qkv.weight"] *= 40.0
        sd[f"blocks.{i}.mlp.inverted_conv.conv.weight"] *= 8.0
    model = SanaTransformer(cfg)
    model.load_state_dict(sd)
    g = torch.Generator().manual_seed(0)
    x, context = 3 * torch.randn(1, 32, 32, 32, generator=g), 4 * torch.randn(1, 20, cfg.caption_dim, generator=g)
    t = torch.tensor([900.0])
    with torch.no_grad():
        ref = model(x, t, context)
        for dtype, tol in ((torch.float16, 1e-2), (torch.bfloat16, 5e-2)):
            out = model.to(dtype)(x.to(dtype), t, context.to(dtype))
            assert out.dtype == dtype and torch.isfinite(out).all()
            assert rel_err(out.float(), ref) < tol
            model.float()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_full_size_configs_match_diffusers_and_published_counts(name):
    """Built on the meta device (no memory): same parameter count as diffusers' model, the
    published counts for 0.6B and 1.6B, and the variant is detected back from the shapes."""
    cfg = CONFIGS[name]
    with torch.device("meta"):
        ours = SanaTransformer(cfg)
        theirs = diffusers_model(cfg) if name != "sana-1.5-4.8b" else None  # = sana-1.5-1.6b with 60 blocks
    count = sum(p.numel() for p in ours.parameters())
    if theirs is not None:
        assert count == sum(p.numel() for p in theirs.parameters())
    published = {"sana-0.6b": 591_747_872, "sana-1.6b": 1_604_462_752}
    if name in published:
        assert count == published[name]
    settings = {"pe_interpolation": cfg.pe_interpolation, "base_size": cfg.base_size}
    detected = detect_config(ours.state_dict(), settings)
    assert detected == cfg and detected.variant == name


@pytest.mark.parametrize("name", ["sana-1.5-qk-norm", "sprint"])
def test_encoded_caption_gives_the_same_velocity_as_raw_context(name):
    """Samplers encode the caption side once (encode_caption) and pass the Caption at every step: the
    same velocity, bit for bit, as passing the hidden states and mask; a Caption plus a mask, or one
    encoded for another batch, is refused."""
    cfg = VARIANTS[name]
    model = SanaTransformer(cfg)
    model.load_state_dict(random_state_dict(cfg, seed=2))
    x, context, mask = inputs(cfg)
    t, kw = torch.tensor([730.0, 50.0]), dict(guidance=torch.tensor([4.5, 3.0])) if cfg.sprint else {}
    with torch.no_grad():
        caption = model.encode_caption(context, mask)
        assert torch.equal(model(x, t, caption, **kw), model(x, t, context, mask, **kw))
        with pytest.raises(ValueError, match="context_mask=None"):
            model(x, t, caption, mask, **kw)
        with pytest.raises(ValueError, match="batch"):
            model(x[:1], t[:1], caption, **({"guidance": kw["guidance"][:1]} if kw else {}))
