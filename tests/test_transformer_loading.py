"""load_transformer: what it infers (heads, 2K/4K position embedding), what it accepts (prefixes,
pipeline folders, fp8), and the errors bad files and bad inputs give."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import rel_err
from sana_core import CheckpointError
from sana_core.demo import DEMO_CAPTION_DIM, write_demo_transformer
from sana_core.transformer import SanaConfig, SanaTransformer, config_metadata, load_transformer, random_state_dict

TINY = SanaConfig(depth=2, width=64, caption_dim=48, self_heads=2, cross_heads=2, mlp_hidden=160)
CPU = dict(dtype=torch.float32, device="cpu")


def save(path, cfg=TINY, *, metadata=True, extra=None, prefix="", seed=0):
    sd = random_state_dict(cfg, seed=seed)
    sd.update(extra or {})
    save_file({prefix + k: v for k, v in sd.items()}, path, metadata=config_metadata(cfg) if metadata else None)
    return path


def run(model, batch=2, h=3, w=5, **kw):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 32, h, w, generator=g)
    context = torch.randn(batch, 6, model.config.caption_dim, generator=g)
    with torch.no_grad():
        return model(x, torch.full((batch,), 500.0), context, torch.ones(batch, 6), **kw)


# ----------------------------------------------------------------------------- inference of settings

@pytest.mark.parametrize("name, expected", [
    ("Sana_1600M_2Kpx_BF16.safetensors", (1.0, 64)),
    ("Sana_1600M_4Kpx_BF16.safetensors", (2.0, 128)),
    ("sana_img2048.safetensors", (1.0, 64)),
    ("sana-4096x4096.safetensors", (2.0, 128)),
    ("Sana_1600M_1024px_BF16.safetensors", (None, None)),
    ("Sana_4800M_1024px.safetensors", (None, None)),  # "4800" is no resolution
])
def test_position_embedding_from_the_file_name(tmp_path, name, expected):
    model = load_transformer(save(tmp_path / name, metadata=False), cross_heads=2, **CPU)
    assert (model.config.pe_interpolation, model.config.base_size) == expected


def test_position_embedding_sources_in_order(tmp_path):
    """hints > metadata > file name > the stale pos_embed's grid (64 x 64 in 2K files)."""
    path = save(tmp_path / "Sana_2Kpx.safetensors", metadata=False)
    assert load_transformer(path, cross_heads=2, resolution=1024, **CPU).config.pe_interpolation is None
    assert load_transformer(path, cross_heads=2, resolution=4096, **CPU).config.base_size == 128
    path = save(tmp_path / "Sana_2Kpx_meta.safetensors")  # metadata says: no position embedding
    assert load_transformer(path, **CPU).config.pe_interpolation is None
    stale = {"pos_embed": torch.zeros(1, 64 * 64, 64)}
    config = load_transformer(save(tmp_path / "renamed.safetensors", metadata=False, extra=stale),
                              cross_heads=2, **CPU).config
    assert (config.pe_interpolation, config.base_size) == (1.0, 64)
    small = {"pos_embed": torch.zeros(1, 32 * 32, 64)}  # a 1024 px file: no position embedding
    path = save(tmp_path / "renamed_1k.safetensors", metadata=False, extra=small)
    assert load_transformer(path, cross_heads=2, **CPU).config.pe_interpolation is None


def test_cross_heads_of_published_widths_need_no_hint():
    from sana_core.transformer import detect_config

    for width, heads in ((1152, 16), (2240, 20)):
        with torch.device("meta"):
            sd = SanaTransformer(SanaConfig(depth=1, width=width, self_heads=width // 32, cross_heads=heads,
                                            mlp_hidden=width * 5 // 2)).state_dict()
        assert detect_config(sd, {}).cross_heads == heads


def test_unknown_width_without_heads_is_a_clear_error(tmp_path):
    path = save(tmp_path / "tiny.safetensors", metadata=False)
    with pytest.raises(CheckpointError, match="cross_heads"):
        load_transformer(path, **CPU)
    with pytest.raises(TypeError, match="accepted: cross_heads"):
        load_transformer(path, cross_head=2, **CPU)


# ----------------------------------------------------------------------------- accepted layouts

@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "model.", "diffusion_model."])
def test_comfyui_prefixes(tmp_path, prefix):
    plain = load_transformer(save(tmp_path / "a.safetensors"), **CPU)
    prefixed = load_transformer(save(tmp_path / "b.safetensors", prefix=prefix), **CPU)
    assert rel_err(run(prefixed), run(plain)) == 0


def test_diffusers_pipeline_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.SanaTransformer2DModel(
        num_layers=1, num_attention_heads=2, attention_head_dim=32, num_cross_attention_heads=2,
        cross_attention_head_dim=32, cross_attention_dim=64, caption_channels=48)
    ref.save_pretrained(tmp_path / "Sana_diffusers" / "transformer")
    (tmp_path / "Sana_diffusers" / "model_index.json").write_text(json.dumps({"_class_name": "SanaPipeline"}))
    model = load_transformer(tmp_path / "Sana_diffusers", **CPU)
    assert model.config.depth == 1 and model.config.caption_dim == 48


def test_fp8_weights_compute_as_upcast(tmp_path):  # kept fp8 in the blocks (tests/test_quantized.py)
    sd = random_state_dict(TINY)
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        save_file({k: v.to(fp8) for k, v in sd.items()}, tmp_path / "fp8.safetensors", metadata=config_metadata(TINY))
        model = load_transformer(tmp_path / "fp8.safetensors", **CPU)
        assert model.blocks[0].attn.qkv.weight.dtype == fp8 and model.t_block[1].weight.dtype == torch.float32
        upcast = SanaTransformer(TINY)
        upcast.load_state_dict({k: v.to(fp8).float() for k, v in sd.items()})
        assert rel_err(run(model), run(upcast)) < 1e-6
        assert rel_err(run(model), run(load_transformer(save(tmp_path / "full.safetensors"), **CPU))) > 1e-3


def test_loads_at_the_requested_dtype(tmp_path):
    model = load_transformer(save(tmp_path / "a.safetensors"), dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    x = torch.randn(1, 32, 4, 4)
    assert model(x, torch.tensor([10.0]), torch.randn(1, 3, 48)).dtype == torch.float32  # x's dtype


def test_demo_files():
    """write_demo_transformer: a loadable tiny model with non-trivial output; the Sprint one has
    the guidance embedder and q/k norm."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        plain = load_transformer(write_demo_transformer(Path(d) / "a.safetensors"), **CPU)
        sprint = load_transformer(write_demo_transformer(Path(d) / "b.safetensors", sprint=True), **CPU)
        other = load_transformer(write_demo_transformer(Path(d) / "c.safetensors", seed=1), **CPU)
    assert plain.config.caption_dim == DEMO_CAPTION_DIM and not plain.config.sprint
    assert sprint.config.sprint and sprint.config.qk_norm
    out = run(plain)
    assert out.std() > 0.1 and rel_err(run(other), out) > 0.1
    assert run(sprint, guidance=torch.tensor([4.5, 4.5])).std() > 0.1


# ----------------------------------------------------------------------------- bad files

def test_truncated_files(tmp_path):
    path = save(tmp_path / "cut.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_transformer(path, **CPU)
    torch.save({"state_dict": random_state_dict(TINY)}, tmp_path / "cut.pth")
    data = (tmp_path / "cut.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_transformer(tmp_path / "cut.pth", **CPU)


def test_autoencoder_file_is_named_as_such(tmp_path):
    dcae = {"encoder.project_in.conv.weight": torch.zeros(128, 3, 3, 3),
            "encoder.stages.0.0.main.conv.weight": torch.zeros(128, 128, 3, 3),
            "decoder.project_in.main.conv.weight": torch.zeros(1024, 32, 3, 3)}
    save_file(dcae, tmp_path / "dc-ae.safetensors")
    with pytest.raises(CheckpointError, match="autoencoder.*load_autoencoder"):
        load_transformer(tmp_path / "dc-ae.safetensors", **CPU)


def test_text_encoder_file_is_named_as_such(tmp_path):
    gemma = {"model.embed_tokens.weight": torch.zeros(10, 8),
             "model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8)}
    save_file(gemma, tmp_path / "gemma.safetensors")
    with pytest.raises(CheckpointError, match="text encoder.*load_text_encoder"):
        load_transformer(tmp_path / "gemma.safetensors", **CPU)


def test_missing_and_unknown_keys_are_named(tmp_path):
    sd = random_state_dict(TINY)
    del sd["blocks.1.mlp.depth_conv.conv.bias"]
    sd["blocks.0.attn.rope.freqs"] = torch.zeros(4)
    save_file(sd, tmp_path / "odd.safetensors", metadata=config_metadata(TINY))
    with pytest.raises(CheckpointError, match="blocks.1.mlp.depth_conv.conv.bias.*blocks.0.attn.rope.freqs"):
        load_transformer(tmp_path / "odd.safetensors", **CPU)


def test_diffusers_file_missing_a_fused_part_is_named(tmp_path):
    from sana_core.transformer import diffusers_to_original

    tensors = {"transformer_blocks.0.attn1.to_q.weight": torch.zeros(2, 2),
               "transformer_blocks.0.attn1.to_k.weight": torch.zeros(2, 2)}
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.0\.attn1\.to_v\.weight"):
        diffusers_to_original(tensors)


def test_wrong_dtype_is_a_clear_error(tmp_path):
    save(tmp_path / "int.safetensors", extra={"blocks.0.scale_shift_table": torch.zeros(6, 64, dtype=torch.int32)})
    with pytest.raises(CheckpointError, match="int32"):
        load_transformer(tmp_path / "int.safetensors", **CPU)


# ----------------------------------------------------------------------------- bad inputs

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_transformer(save(tmp_path_factory.mktemp("tiny") / "t.safetensors"), **CPU)


def test_wrong_latent_channels(tiny):
    with pytest.raises(ValueError, match=r"\[2, 16, 3, 5\].*\[B, 32, h, w\]"):
        tiny(torch.randn(2, 16, 3, 5), torch.tensor([1.0, 1.0]), torch.randn(2, 4, 48))


def test_mismatched_context_width(tiny):
    with pytest.raises(ValueError, match=r"\[2, 4, 2304\].*\[2, T, 48\]"):
        tiny(torch.randn(2, 32, 3, 5), torch.tensor([1.0, 1.0]), torch.randn(2, 4, 2304))


def test_guidance_only_for_sprint(tiny, tmp_path):
    with pytest.raises(ValueError, match="Sprint"):
        run(tiny, guidance=torch.tensor([4.5, 4.5]))
    sprint = load_transformer(save(tmp_path / "s.safetensors", dataclasses.replace(TINY, sprint=True)), **CPU)
    with pytest.raises(ValueError, match="guidance"):
        run(sprint)


def test_all_padding_caption_gives_no_nan(tiny):
    x = torch.randn(1, 32, 3, 5)
    out = tiny(x, torch.tensor([500.0]), torch.randn(1, 4, 48), torch.zeros(1, 4))
    assert torch.isfinite(out).all()
