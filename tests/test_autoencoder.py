"""DC-AE f32c32 (sana_core.autoencoder) against diffusers' AutoencoderDC with the same random weights,
written in every layout users bring: diffusers folder, diffusers single file, original mit-han-lab
.safetensors and .pth (nested under "state_dict"). Tiny configs with the SANA structure, CPU, float32."""
import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import rel_err
import sana_core.autoencoder as ae
from sana_core import CheckpointError, load_autoencoder
from sana_core import runtime
from sana_core.runtime import Runtime, decode_tile

diffusers = pytest.importorskip("diffusers")

TINY = dict(  # the SANA f32c32 config with narrow stages and 8-channel heads
    in_channels=3, latent_channels=32, attention_head_dim=8,
    encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    encoder_block_out_channels=[8, 16, 32, 32, 64, 64], decoder_block_out_channels=[8, 16, 32, 32, 64, 64],
    encoder_layers_per_block=[2, 2, 2, 3, 3, 3], decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
    encoder_qkv_multiscales=[[], [], [], [5], [5], [5]], decoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
    downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407)

# diffusers name -> original mit-han-lab (efficientvit) name: the inverse of ORIGINAL_TO_DIFFUSERS,
# spelled out from efficientvit's module tree (ResidualBlock.main, OpSequential.op_list, ConvLayer.conv)
TO_ORIGINAL = [
    (r"^encoder\.conv_in\.", "encoder.project_in.conv."),
    (r"^encoder\.conv_out\.", "encoder.project_out.main.op_list.0.conv."),
    (r"^decoder\.conv_in\.", "decoder.project_in.main.conv."),
    (r"^decoder\.norm_out\.", "decoder.project_out.op_list.0."),
    (r"^decoder\.conv_out\.", "decoder.project_out.op_list.2.conv."),
    (r"^encoder\.down_blocks\.(\d+)\.(\d+)\.conv\.", r"encoder.stages.\1.op_list.\2.main.conv."),
    (r"^decoder\.up_blocks\.(\d+)\.(\d+)\.conv\.", r"decoder.stages.\1.op_list.\2.main.conv.conv."),
    (r"^(en|de)coder\.(down|up)_blocks\.", r"\1coder.stages."),
    (r"^(\w+)\.stages\.(\d+)\.(\d+)\.", r"\1.stages.\2.op_list.\3."),
    (r"\.conv1\.", ".main.conv1.conv."), (r"\.conv2\.", ".main.conv2.conv."), (r"op_list\.(\d+)\.norm\.", r"op_list.\1.main.conv2.norm."),
    (r"\.attn\.to_qkv_multiscale\.0\.proj_in\.", ".context_module.main.aggreg.0.0."),
    (r"\.attn\.to_qkv_multiscale\.0\.proj_out\.", ".context_module.main.aggreg.0.1."),
    (r"\.attn\.to_qkv\.weight", ".context_module.main.qkv.conv.weight"),
    (r"\.attn\.to_out\.", ".context_module.main.proj.conv."), (r"\.attn\.norm_out\.", ".context_module.main.proj.norm."),
    (r"\.conv_out\.conv_inverted\.", ".local_module.main.inverted_conv.conv."),
    (r"\.conv_out\.conv_depth\.", ".local_module.main.depth_conv.conv."),
    (r"\.conv_out\.conv_point\.", ".local_module.main.point_conv.conv."),
    (r"\.conv_out\.norm\.", ".local_module.main.point_conv.norm."),
]


def to_original(diffusers_sd: dict) -> dict:
    """diffusers AutoencoderDC state dict -> the original layout (qkv fused, 1x1 convs 4-D)."""
    sd = {}
    for k, v in diffusers_sd.items():
        if k.endswith(("attn.to_k.weight", "attn.to_v.weight")):
            continue
        if k.endswith("attn.to_q.weight"):
            p = k[:-len("to_q.weight")]
            k, v = p + "to_qkv.weight", torch.cat([v, diffusers_sd[p + "to_k.weight"], diffusers_sd[p + "to_v.weight"]])
        if k.endswith("attn.to_out.weight"):
            v = v[:, :, None, None]
        if k.endswith("attn.to_qkv.weight"):
            v = v[:, :, None, None]
        for pattern, repl in TO_ORIGINAL:
            k = re.sub(pattern, repl, k)
        sd[k] = v.clone()
    return sd


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    model = diffusers.AutoencoderDC(**TINY).eval()
    with torch.no_grad():  # norms away from (1, 0) so that their weights matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    root = tmp_path_factory.mktemp("dcae")
    ref.save_pretrained(root / "diffusers")
    single = root / "dc-ae-diffusers.safetensors"
    shutil.copy(root / "diffusers" / "diffusion_pytorch_model.safetensors", single)
    original = to_original(ref.state_dict())
    save_file(original, root / "dc-ae-original.safetensors")
    torch.save({"state_dict": original, "epoch": 3}, root / "model.pth")
    return {"folder": root / "diffusers", "single": single, "original": root / "dc-ae-original.safetensors",
            "pth": root / "model.pth", "root": root}


def test_original_layout_written_here_is_what_diffusers_converts(ref):
    """Guards the test's own inverse map: diffusers' converter of original files must undo it."""
    from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers
    sd = ref.state_dict()
    back = convert_autoencoder_dc_checkpoint_to_diffusers(to_original(sd))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.fixture(scope="module")
def expected(ref):
    """diffusers' outputs: tiny sizes take the quadratic attention (stage H*W <= head dim), 256 px the
    linear one."""
    torch.manual_seed(2)
    cases = []
    for batch, side in ((2, 1), (2, 2), (1, 8)):  # latent sides: 32, 64 and 256 px
        latent = torch.randn(batch, 32, side, side)
        image = torch.rand(batch, 3, 32 * side, 32 * side) * 2 - 1
        with torch.no_grad():
            decoded = ref.decoder(latent / 0.41407)
            cases.append((latent, decoded, image, ref.encode(image).latent * 0.41407))
        assert (decoded.abs() > 1).float().mean() < 0.05  # so that the clamp hides nothing
    return cases


@pytest.mark.parametrize("fmt", ["folder", "original"])
def test_decode_and_encode_match_diffusers(files, expected, fmt):
    model = load_autoencoder(files[fmt], device="cpu")
    assert model.dtype == torch.float32 and model.latent_channels == 32 and model.scaling_factor == 0.41407
    for latent, decoded, image, encoded in expected:
        out = model.decode(latent)
        assert out.shape == decoded.shape and out.dtype == torch.float32
        assert rel_err(out, decoded.clamp(-1, 1)) < 1e-4
        assert rel_err(model.encode(image), encoded) < 1e-4


@pytest.mark.parametrize("fmt", ["single", "pth"])
def test_every_layout_loads_the_same_weights(files, fmt):
    want = load_autoencoder(files["folder"], device="cpu").state_dict()
    got = load_autoencoder(files[fmt], device="cpu").state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_geometry_is_read_from_the_tensors(files):
    config = load_autoencoder(files["single"], device="cpu").config  # no config.json beside it
    assert config.decoder_widths == (8, 16, 32, 32, 64, 64) and config.decoder_depths == (3,) * 6
    assert config.encoder_depths == (2, 2, 2, 3, 3, 3) and config.head_dim == 8
    assert config.decoder_scales == (None, None, None, (5,), (5,), (5,)) == config.encoder_scales


def test_full_size_decoder_has_159m_parameters():
    model = ae.DCAE(ae.FULL_CONFIG, device="meta")
    assert sum(p.numel() for p in model.decoder.parameters()) == 159_223_171
    assert model.decoder.local_halo * model.decoder.local_scale == 56  # receptive field of stages 0-2 + head
    assert model.config.variant == "dc-ae-f32c32-sana"


def test_state_dict_converts_back_to_diffusers_names(ref, files):
    model = load_autoencoder(files["original"], device="cpu")
    sd = ae.to_diffusers_names(model.state_dict())
    want = ref.state_dict()
    assert set(sd) == set(want) and all(torch.equal(sd[k], want[k]) for k in want)


def naive_relu_attention(qkv, d, eps=1e-15):
    B, _, H, W = qkv.shape
    q, k, v = qkv.double().reshape(B, -1, 3 * d, H * W).split(d, dim=2)
    a = torch.einsum("bhdm,bhdn->bhmn", k.relu(), q.relu())  # (B, h, N_k, N_q)
    out = torch.einsum("bhdm,bhmn->bhdn", v, a) / (a.sum(2, keepdim=True) + eps)
    return out.reshape(B, -1, H, W)


@pytest.mark.parametrize("side", [4, 16])  # 16 positions <= head dim 32: quadratic; 256: linear
def test_linear_attention_is_relu_attention_and_finite_in_fp16(side):
    qkv = torch.randn(2, 3 * 3 * 32, side, side)
    assert rel_err(ae.dcae_linear_attention(qkv, 32), naive_relu_attention(qkv, 32)) < 1e-5
    big = (qkv * 60).half()  # q.k sums reach ~1e6, beyond float16: accumulation must be float32
    out = ae.dcae_linear_attention(big, 32)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert rel_err(out, naive_relu_attention(big.float(), 32)) < 2e-3


@pytest.mark.parametrize("cin, cout", [(8, 2), (8, 4), (8, 8), (4, 8)])  # channel repeats 1, 2, 4, 8
def test_upsample_phase_convolutions_equal_interpolate_then_conv(cin, cout):
    up = ae.Upsample(cin, cout).requires_grad_(False)
    x = torch.randn(2, cin, 5, 7)
    y = F.pixel_shuffle(x.repeat_interleave(4 * cout // cin, dim=1), 2)
    want = up.conv(F.interpolate(x, scale_factor=2, mode="nearest")) + y
    assert rel_err(up(x), want) < 1e-6


def test_bands_and_head_groups_change_nothing(files, monkeypatch):
    """Tiny WORK_BYTES: every block runs on 8-row bands with context, attention one head at a time."""
    model = load_autoencoder(files["single"], device="cpu")
    latent, image = torch.randn(1, 32, 2, 3), torch.rand(1, 3, 64, 96) * 2 - 1
    whole, encoded = model.decode(latent), model.encode(image)
    monkeypatch.setattr(ae, "WORK_BYTES", 1)
    with torch.backends.mkldnn.flags(enabled=False):  # oneDNN would compile kernels for every band shape
        assert rel_err(model.decode(latent), whole) < 1e-6
        assert rel_err(model.encode(image), encoded) < 1e-6


def test_tiled_decode_equals_untiled(files):
    """Only stages 0-2 are tiled, with their receptive field as context: no seams, nothing to blend."""
    model = load_autoencoder(files["single"], device="cpu")
    latent = torch.randn(1, 32, 4, 6)  # 128 x 192 px
    untiled = model.decode(latent)
    assert torch.equal(model.decode_tiled(latent, tile=192), untiled)  # one tile covers it: same code
    # 3 x 4 tiles of 40-48 px (uneven), each reading 56 px of context
    assert (model.decode_tiled(latent, tile=48) - untiled).abs().max() < 1e-5
    # without context, tile borders differ (so the check above can fail); a little context is close
    no_context = model.decode_tiled(latent, tile=48, overlap=0)
    assert rel_err(no_context, untiled) > 1e-2
    assert rel_err(model.decode_tiled(latent, tile=48, overlap=24), untiled) < rel_err(no_context, untiled) / 10
    assert torch.equal(Runtime().decode(model, latent), untiled)  # on the CPU: untiled


def test_decode_tile_picks_untiled_when_it_fits_else_the_biggest_tile_that_fits():
    model = ae.DCAE(ae.FULL_CONFIG, dtype=torch.bfloat16, device="meta")
    gib = 1 << 30
    assert decode_tile(model, 1, 32, 32, 16 * gib) is None  # 1024 px
    assert decode_tile(model, 1, 128, 128, 40 * gib) is None  # 4096 px on a big card
    tiles = [decode_tile(model, 1, 128, 128, f * gib) for f in (10, 6, 4, 1)]
    assert all(t is not None for t in tiles) and tiles == sorted(tiles, reverse=True)
    assert model.activation_bytes(1, 128, 128, tile=ae.DEFAULT_TILE) <= 4 * gib  # the 4K design target


def test_bfloat16_decodes_close_to_float32(files):
    model32 = load_autoencoder(files["folder"], device="cpu")
    model16 = load_autoencoder(files["folder"], device="cpu", dtype=torch.bfloat16)
    latent = torch.randn(1, 32, 4, 4)
    out = model16.decode(latent)
    assert model16.dtype == torch.bfloat16 and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel_err(out, model32.decode(latent)) < 0.05


def test_preview_projection_predicts_patch_colours(files):
    model = load_autoencoder(files["single"], device="cpu")
    weight, bias = model.preview_projection()
    assert weight.shape == (32, 3) and bias.shape == (3,) and model.preview_projection()[0] is weight
    g = torch.Generator().manual_seed(7)  # latents like those it was fitted on, not the same ones
    z = F.interpolate(torch.randn(4, 32, 5, 5, generator=g), size=(8, 8), mode="bilinear", align_corners=True)
    z = z + 0.3 * torch.randn(z.shape, generator=g)
    z = z / z.std(dim=(0, 2, 3), keepdim=True)
    colour = F.avg_pool2d(model.decode(z), 32)
    guess = torch.einsum("bchw,cr->brhw", z, weight) + bias.view(1, 3, 1, 1)
    # better than the best constant (random tiny decoders are far from linear: R^2 ~ 0.1-0.3)
    assert ((guess - colour) ** 2).mean() < 0.95 * colour.var(dim=(0, 2, 3)).mean()


def test_decoder_only_file_decodes_and_says_why_it_cannot_encode(files):
    sd = load_file(files["single"])
    path = files["root"] / "decoder-only.safetensors"
    save_file({k: v for k, v in sd.items() if k.startswith("decoder.")}, path)
    model = load_autoencoder(path, device="cpu")
    assert model.decode(torch.randn(1, 32, 1, 1)).shape == (1, 3, 32, 32)
    with pytest.raises(CheckpointError, match="only the decoder"):
        model.encode(torch.zeros(1, 3, 32, 32))


def test_bad_inputs_get_clear_errors(files):
    model = load_autoencoder(files["single"], device="cpu")
    with pytest.raises(ValueError, match=r"\(B, 32, h, w\).*SD/SDXL/Flux"):
        model.decode(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        model.decode(torch.full((1, 32, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="multiples of 32, got 50x40"):
        model.encode(torch.zeros(1, 3, 40, 50))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(torch.zeros(1, 4, 64, 64))


def test_wrong_files_are_named_for_what_they_are(files):
    root = files["root"]
    transformer = {"x_embedder.proj.weight": torch.zeros(8, 32, 1, 1), "blocks.0.scale_shift_table": torch.zeros(6, 8)}
    save_file(transformer, root / "sana_dit.safetensors")
    with pytest.raises(CheckpointError, match="transformer.*load_transformer"):
        load_autoencoder(root / "sana_dit.safetensors", device="cpu")
    gemma = {"model.embed_tokens.weight": torch.zeros(10, 4), "model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)}
    save_file(gemma, root / "gemma.safetensors")
    with pytest.raises(CheckpointError, match="text encoder.*load_text_encoder"):
        load_autoencoder(root / "gemma.safetensors", device="cpu")
    sd_vae = {"decoder.conv_in.weight": torch.zeros(8, 4, 3, 3), "decoder.up_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}
    save_file(sd_vae, root / "sdxl_vae.safetensors")
    with pytest.raises(CheckpointError, match="another kind of VAE"):
        load_autoencoder(root / "sdxl_vae.safetensors", device="cpu")


# DC-AE-Lite (dc-ae-lite-f32c32-sana-1.1): efficientvit's model zoo config (decoder.block_type=ResBlock,
# depth_list=[0,3,5,4,4,4], out_act=silu, default ConvPixelShuffle upsampling) as diffusers' AutoencoderDC arguments
LITE = {**TINY, "decoder_block_types": "ResBlock", "decoder_layers_per_block": [0, 3, 5, 4, 4, 4],
        "decoder_qkv_multiscales": [[]] * 6, "upsample_block_type": "pixel_shuffle", "decoder_conv_act_fn": "silu",
        "downsample_block_type": "Conv"}


def randomized(config: dict, seed=0):
    torch.manual_seed(seed)
    model = diffusers.AutoencoderDC(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    root = tmp_path_factory.mktemp("lite")
    ref = randomized(LITE)
    ref.save_pretrained(root / "dc-ae-lite-f32c32-sana-1.1-diffusers")
    original = root / "dc-ae-lite-f32c32-sana-1.1"  # efficientvit's folder: model.safetensors + its own config.json
    original.mkdir()
    save_file(to_original(ref.state_dict()), original / "model.safetensors")
    (original / "config.json").write_text(json.dumps({"model_name": "dc-ae-lite-f32c32-sana-1.1"}))
    return ref, {"diffusers": root / "dc-ae-lite-f32c32-sana-1.1-diffusers", "original": original,
                 "single": original / "model.safetensors"}


@pytest.mark.parametrize("fmt", ["diffusers", "original", "single"])
def test_dcae_lite_matches_diffusers_in_every_layout(lite, fmt):
    ref, paths = lite
    model = load_autoencoder(paths[fmt], device="cpu")
    config = model.config
    assert config.decoder_depths == (0, 3, 5, 4, 4, 4) and not config.upsample_interpolate
    assert config.decoder_out_act == "silu" and config.decoder_widths == (8, 16, 32, 32, 64, 64)
    assert model.decoder.first_global == 6 and model.decoder.local_scale == 32  # no attention: all local
    torch.manual_seed(1)
    for batch, side in ((2, 1), (1, 4)):
        latent = torch.randn(batch, 32, side, side + 1)
        with torch.no_grad():
            want = ref.decoder(latent / 0.41407)
        assert (want.abs() > 1).float().mean() < 0.05
        assert rel_err(model.decode(latent), want.clamp(-1, 1)) < 1e-4
    image = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        assert rel_err(model.encode(image), ref.encode(image).latent * 0.41407) < 1e-4


def test_dcae_lite_tiles_without_seams(lite):
    model = load_autoencoder(lite[1]["diffusers"], device="cpu")
    latent = torch.randn(1, 32, 4, 6)
    untiled = model.decode(latent)
    assert (model.decode_tiled(latent, tile=64) - untiled).abs().max() < 1e-5  # 2 x 3 tiles, full context
    assert rel_err(model.decode_tiled(latent, tile=64, overlap=0), untiled) > 1e-2  # the context matters
    full = ae.DCAE(ae.LITE_CONFIG, device="meta")
    assert full.config.variant == "dc-ae-lite-f32c32-sana" and ae.DCAE(ae.FULL_CONFIG, device="meta").decoder.first_global == 3


@pytest.mark.parametrize("options", [
    dict(upsample_block_type="pixel_shuffle"),        # any value but "interpolate" pixel-shuffles
    dict(downsample_block_type="pixel_unshuffle"),
    dict(decoder_conv_act_fn="silu", decoder_in_shortcut=False, encoder_out_shortcut=False),
])
def test_options_are_read_as_diffusers_reads_them(tmp_path, options):
    ref = randomized({**TINY, **options})
    ref.save_pretrained(tmp_path)
    model = load_autoencoder(tmp_path, device="cpu")
    latent, image = torch.randn(1, 32, 2, 3), torch.rand(1, 3, 64, 32) * 2 - 1
    with torch.no_grad():
        assert rel_err(model.decode(latent), ref.decoder(latent / 0.41407).clamp(-1, 1)) < 1e-4
        assert rel_err(model.encode(image), ref.encode(image).latent * 0.41407) < 1e-4


@pytest.mark.parametrize("key, value", [("decoder_conv_act_fn", "gelu"), ("decoder_norm_types", "batch_norm"),
                                        ("decoder_act_fns", ["relu"] * 6)])
def test_unsupported_option_names_the_option_and_value(files, tmp_path, key, value):
    folder = tmp_path / "vae"
    shutil.copytree(files["folder"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(CheckpointError, match=f"config.json has {key}=.*{value[0] if isinstance(value, list) else value}"):
        load_autoencoder(folder, device="cpu")


def test_config_json_that_contradicts_the_weights_is_refused(files, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(files["folder"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["decoder_block_out_channels"] = [128, 256, 512, 512, 1024, 1024]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json says decoder_block_out_channels"):
        load_autoencoder(folder, device="cpu")


class _Marker:
    """Unpickling this would create a file: torch.load must refuse (weights_only)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_pth_is_read_with_weights_only(files, tmp_path):
    marker = tmp_path / "code-ran"
    sd = {"state_dict": torch.load(files["pth"], weights_only=True)["state_dict"], "hook": _Marker(str(marker))}
    torch.save(sd, tmp_path / "unsafe.pth")
    with pytest.raises(CheckpointError, match="holds Python objects or code besides tensors"):
        load_autoencoder(tmp_path / "unsafe.pth", device="cpu")
    assert not marker.exists()


def test_demo_autoencoder_makes_non_constant_images(tmp_path):
    from sana_core.demo import write_demo_autoencoder
    path = write_demo_autoencoder(tmp_path / "demo_dcae.safetensors", seed=3)
    assert any(k.endswith("attn.to_q.weight") for k in load_file(path))  # diffusers layout
    model = load_autoencoder(path, device="cpu")
    assert len(model.config.decoder_widths) == 6 and model.spatial_compression == 32
    image = model.decode(torch.randn(1, 32, 2, 2))
    assert image.shape == (1, 3, 64, 64) and image.std() > 0.05 and (image.abs() < 1).float().mean() > 0.5
    assert model.encode(image).shape == (1, 32, 2, 2)


class Cancelled(Exception):
    pass


def test_cancel_stops_a_long_decode_between_stages_and_tiles(files, monkeypatch):
    """`between` (the node passes ComfyUI's interrupt check) runs after each stage / tile; raising stops there."""
    model = load_autoencoder(files["single"], device="cpu")
    latent = torch.randn(1, 32, 4, 6)
    calls = []
    model.decode_tiled(latent, tile=48, between=lambda: calls.append(1))
    assert len(calls) == 3 + 12  # 3 global stages, then 3 x 4 tiles

    def cancel_after(n):
        def between():
            calls.append(1)
            if len(calls) >= n:
                raise Cancelled
        return between
    calls.clear()
    with pytest.raises(Cancelled):
        model.decode_tiled(latent, tile=48, between=cancel_after(5))
    assert len(calls) == 5
    monkeypatch.setattr(runtime, "DECODE_MAX_PIXELS", 0)  # a decode too big for one CUDA graph replay
    calls.clear()
    with pytest.raises(Cancelled):
        Runtime().decode(model, latent, between=cancel_after(2))
    assert len(calls) == 2
