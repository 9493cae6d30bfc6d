"""Folders laid out exactly as the published ones: diffusers' classes built with the arguments of diffusers'
converter scripts (scripts/convert_dcae_to_diffusers.py, scripts/convert_sana_to_diffusers.py), scaled
down, saved with save_pretrained, then config.json patched where the published files differ from what
today's diffusers writes (the DC-AE's "Conv"; keys older diffusers releases did not write)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import rel_err
from sana_core import CheckpointError, load_autoencoder, load_transformer
from sana_core.autoencoder import to_diffusers_names

diffusers = pytest.importorskip("diffusers")

# convert_dcae_to_diffusers.get_ae_config("dc-ae-f32c32-sana-1.0"), channels / 16 and 8-channel heads
DCAE_SANA = dict(
    latent_channels=32, attention_head_dim=8,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(8, 16, 32, 32, 64, 64), decoder_block_out_channels=(8, 16, 32, 32, 64, 64),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)), decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
    downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407)
NEWER_DCAE_KEYS = ("decoder_conv_act_fn", "decoder_in_shortcut", "encoder_out_shortcut")  # diffusers >= 0.35


def patch_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2))


@pytest.mark.parametrize("older_diffusers", [False, True])
def test_published_dcae_folder_with_Conv_loads_and_equals_diffusers(tmp_path, older_diffusers):
    """dc-ae-f32c32-sana-1.1-diffusers (and every SANA pipeline's vae/) says "Conv"; diffusers reads any value
    but "pixel_unshuffle" as a strided conv."""
    torch.manual_seed(0)
    ref = diffusers.AutoencoderDC(**DCAE_SANA).eval()
    pipeline = tmp_path / "Sana_1600M_1024px_diffusers"
    ref.save_pretrained(pipeline / "vae")
    patch_config(pipeline / "vae", downsample_block_type="Conv",
                 **({k: None for k in NEWER_DCAE_KEYS} if older_diffusers else {}))
    model = load_autoencoder(pipeline, device="cpu")  # the pipeline folder: its vae/
    latent, image = torch.randn(2, 32, 2, 3), torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        assert rel_err(model.decode(latent), ref.decoder(latent / 0.41407).clamp(-1, 1)) < 1e-4
        assert rel_err(model.encode(image), ref.encode(image).latent * 0.41407) < 1e-4


# convert_sana_to_diffusers.py's transformer_kwargs, width 64 (2 self heads of 32, 2 cross heads), 2 layers
def sana_kwargs(image_size, *, sprint=False, sana_15=False):
    kwargs = dict(in_channels=32, out_channels=32, num_attention_heads=2, attention_head_dim=32, num_layers=2,
                  num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64,
                  caption_channels=48, mlp_ratio=2.5, attention_bias=False, sample_size=image_size // 32,
                  patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6,
                  interpolation_scale={512: None, 1024: None, 2048: 1.0, 4096: 2.0}[image_size])
    if sprint or sana_15:
        kwargs["qk_norm"] = "rms_norm_across_heads"
    if sprint:
        kwargs["guidance_embeds"] = True
    return kwargs


def save_transformer(folder, kwargs, **config_changes):
    torch.manual_seed(0)
    ref = diffusers.SanaTransformer2DModel(**kwargs).eval()
    with torch.no_grad():
        for p in ref.parameters():  # every weight matters (zero-initialised gates, tables)
            p.copy_(torch.randn_like(p) / max(p.shape[-1], 1) ** 0.5)
    ref.save_pretrained(folder)
    patch_config(folder, **config_changes)
    return ref


def velocities(model, ref, timestep_scale=1.0, guidance_scale=None):
    """Ours takes t * 1000 (and the raw guidance); diffusers' SanaPipeline passes t * 1000 * timestep_scale,
    its Sprint pipeline t in [0, 1] and guidance * guidance_embeds_scale."""
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 32, 3, 5, generator=g), torch.randn(2, 7, 48, generator=g)
    t = torch.tensor([730.0, 50.0])
    with torch.no_grad():
        if guidance_scale is None:
            return model(x, t, context), ref(x, context, timestep=t * timestep_scale).sample
        guidance = torch.tensor([4.5, 3.0])
        return (model(x, t, context, guidance=guidance),
                ref(x, context, timestep=t / 1000, guidance=guidance * guidance_scale).sample)


@pytest.mark.parametrize("image_size, older_diffusers", [(1024, False), (1024, True), (2048, False), (4096, False)])
def test_interpolation_scale_decides_the_position_embedding_never_the_folder_name(tmp_path, image_size,
                                                                                   older_diffusers):
    """A 1024 px model in a folder whose name says 4K (a cache path, a renamed download) has no position
    embedding: null or absent (older diffusers) interpolation_scale means none."""
    folder = tmp_path / "Sana_1600M_4Kpx_BF16_diffusers" / "transformer"
    ref = save_transformer(folder, sana_kwargs(image_size),
                           **({"interpolation_scale": None} if older_diffusers else {}))
    model = load_transformer(folder.parent, dtype=torch.float32, device="cpu")
    assert model.config.pe_interpolation == {1024: None, 2048: 1.0, 4096: 2.0}[image_size]
    ours, theirs = velocities(model, ref)
    assert rel_err(ours, theirs) < 1e-4


def test_timestep_scale_is_read_from_config(tmp_path):
    """A model whose config says timestep_scale=0.001 (its embedder saw t in [0, 1], as Sprint's teacher)."""
    ref = save_transformer(tmp_path, sana_kwargs(1024, sana_15=True), timestep_scale=0.001)
    model = load_transformer(tmp_path, dtype=torch.float32, device="cpu")
    assert model.config.timestep_scale == 0.001
    ours, theirs = velocities(model, ref, timestep_scale=0.001)
    assert rel_err(ours, theirs) < 1e-4


@pytest.mark.parametrize("guidance_embeds_scale", [0.1, 0.25])
def test_sprint_guidance_embeds_scale_is_read_and_its_timestep_scale_unused(tmp_path, guidance_embeds_scale):
    ref = save_transformer(tmp_path, sana_kwargs(1024, sprint=True), guidance_embeds_scale=guidance_embeds_scale,
                           timestep_scale=1.0)
    model = load_transformer(tmp_path, dtype=torch.float32, device="cpu")
    assert model.config.guidance_embeds_scale == guidance_embeds_scale
    ours, theirs = velocities(model, ref, guidance_scale=guidance_embeds_scale)
    assert rel_err(ours, theirs) < 1e-4


# ----------------------------------------------------------------------------- variant files, legacy .pth

@pytest.fixture(scope="module")
def dcae_sets(tmp_path_factory):
    """Two different random DC-AEs: the plain fp32 weights (sharded, with an index) and a bf16 variant, so that
    a test can tell which set was read."""
    root = tmp_path_factory.mktemp("variants")
    torch.manual_seed(0)
    plain = diffusers.AutoencoderDC(**DCAE_SANA).eval()
    plain.save_pretrained(root / "plain", max_shard_size="200KB")
    torch.manual_seed(1)
    variant = diffusers.AutoencoderDC(**DCAE_SANA).to(torch.bfloat16).eval()
    variant.save_pretrained(root / "bf16", variant="bf16")
    return root, plain, variant


def folder_of(root, name, *, plain=True, bf16=True, drop_shard=False, extra=()):
    folder = root / name
    folder.mkdir()
    shutil.copy(root / "plain" / "config.json", folder)
    if plain:
        for f in (root / "plain").glob("diffusion_pytorch_model*"):
            shutil.copy(f, folder)
        if drop_shard:
            next(folder.glob("diffusion_pytorch_model-00002-of-*.safetensors")).unlink()
    if bf16:
        shutil.copy(root / "bf16" / "diffusion_pytorch_model.bf16.safetensors", folder)
    for file_name in extra:
        save_file({"decoder.conv_in.weight": torch.zeros(4, 4, dtype=torch.uint8)}, folder / file_name)
    return folder


def weights_of(model, ref):
    """Whether `model` (ours) holds exactly `ref`'s weights (diffusers)."""
    ours, theirs = to_diffusers_names(model.state_dict()), ref.state_dict()
    return set(ours) == set(theirs) and all(torch.equal(ours[k].float(), theirs[k].float()) for k in theirs)


def test_variant_matching_the_dtype_else_the_plain_set_never_a_merge(dcae_sets):
    root, plain, variant = dcae_sets
    folder = folder_of(root, "both")
    assert weights_of(load_autoencoder(folder, device="cpu", dtype=torch.bfloat16), variant)
    assert weights_of(load_autoencoder(folder, device="cpu", dtype=torch.float32), plain)
    assert weights_of(load_autoencoder(folder, device="cpu", dtype=torch.float16), plain.half())


def test_only_the_bf16_file_downloaded_loads_converted(dcae_sets):
    root, plain, variant = dcae_sets
    model = load_autoencoder(folder_of(root, "bf16-only", plain=False), device="cpu", dtype=torch.float32)
    assert model.dtype == torch.float32 and weights_of(model, variant)


def test_an_index_with_missing_shards_is_skipped_with_a_note(dcae_sets, caplog):
    root, plain, variant = dcae_sets
    folder = folder_of(root, "missing-shard", drop_shard=True)
    assert weights_of(load_autoencoder(folder, device="cpu", dtype=torch.float32), variant)
    assert "diffusion_pytorch_model-00002-of-" in caplog.text and "skipped" in caplog.text
    alone = folder_of(root, "missing-shard-alone", drop_shard=True, bf16=False)
    with pytest.raises(CheckpointError, match="no complete set.*missing diffusion_pytorch_model-00002-of-"):
        load_autoencoder(alone, device="cpu")


def test_an_int4_file_alone_is_a_clear_error(dcae_sets):
    root, *_ = dcae_sets
    folder = folder_of(root, "int4", plain=False, bf16=False, extra=["diffusion_pytorch_model.int4.safetensors"])
    with pytest.raises(CheckpointError, match=r"only diffusion_pytorch_model\.int4\.safetensors.*bf16"):
        load_autoencoder(folder, device="cpu")
    both = folder_of(root, "int4-and-bf16", plain=False, extra=["diffusion_pytorch_model.int4.safetensors"])
    assert load_autoencoder(both, device="cpu").dtype == torch.float32  # the float variant is taken


@pytest.fixture(scope="module")
def dcae_state(dcae_sets):
    return {k: v.clone() for k, v in dcae_sets[1].state_dict().items()}


def test_legacy_pth_of_tensors_loads(dcae_sets, dcae_state, tmp_path):
    torch.save({"state_dict": dcae_state}, tmp_path / "dcae.pth", _use_new_zipfile_serialization=False)
    assert weights_of(load_autoencoder(tmp_path / "dcae.pth", device="cpu"), dcae_sets[1])


def test_damaged_pth_says_download_it_again(dcae_state, tmp_path):
    for legacy in (False, True):
        path = tmp_path / f"dcae-{legacy}.pth"
        torch.save(dcae_state, path, _use_new_zipfile_serialization=not legacy)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(CheckpointError, match="damaged or incomplete.*download it again"):
            load_autoencoder(path, device="cpu")


class Payload:
    def __reduce__(self):
        return print, ("code ran",)


def test_pth_with_objects_says_so_and_never_suggests_unsafe_loading(dcae_state, tmp_path, capsys):
    for legacy in (False, True):
        path = tmp_path / f"objects-{legacy}.pth"
        torch.save({"state_dict": dcae_state, "trainer": Payload()}, path, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(CheckpointError, match="holds Python objects or code besides tensors") as error:
            load_autoencoder(path, device="cpu")
        assert "weights_only" not in str(error.value) and "print" in str(error.value)
    assert "code ran" not in capsys.readouterr().out
