"""LoRA (sana_core.lora): random LoRAs made by PEFT on diffusers' SanaTransformer2DModel and saved as
diffusers saves them (the oracle loads them with its own LoRA loader), the same LoRAs rewritten in the
kohya / OneTrainer and original-name forms, stacking, exact unloading, and the errors bad files get.

The original-name forms are written with a name map found by running diffusers' own converter
(convert_sana_transformer_to_diffusers) on tensors whose rows carry their name, so our map is checked
against an independent one."""
import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import rel_err
from sana_core import CheckpointError
from sana_core.lora import apply_lora, read_lora, remove_lora, unload_loras
from sana_core.pipeline import SanaPipeline
from sana_core.transformer import SanaConfig, load_transformer, random_state_dict

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from diffusers import SanaTransformer2DModel  # noqa: E402
from diffusers import SanaPipeline as DiffusersSanaPipeline  # noqa: E402
from diffusers.loaders.single_file_utils import convert_sana_transformer_to_diffusers  # noqa: E402
from diffusers.training_utils import _collate_lora_metadata  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

CAPTION = 48
# Every module PEFT can train and merge: q/k/v/out of both attentions, the Mix-FFN 1x1 convs, caption
# projection, timestep embedder and t_block ("linear_1/2", "linear"), patch embedding ("proj"), proj_out.
ALL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv_inverted", "conv_point", "linear_1", "linear_2",
               "linear", "proj", "proj_out"]


def diffusers_dit(heads=2, seed=0, caption=CAPTION) -> SanaTransformer2DModel:
    """A tiny diffusers DiT (width 32 x heads) with O(1) random weights (diffusers zero-inits some layers)."""
    model = SanaTransformer2DModel(
        in_channels=32, out_channels=32, num_layers=2, num_attention_heads=heads, attention_head_dim=32,
        num_cross_attention_heads=heads, cross_attention_head_dim=32, cross_attention_dim=32 * heads,
        caption_channels=caption, mlp_ratio=2.5, sample_size=32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model.eval()


def save_peft_lora(folder, base, *, seed, metadata=True, **config) -> str:
    """A random LoRA (init_lora_weights=False: B is not zero) trained-shape on `base`, saved the way
    train_dreambooth_lora_sana.py saves it (get_peft_model_state_dict + SanaPipeline.save_lora_weights)."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():  # PEFT's random B is large: keep the LoRA a modest change
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.3)
    layers = get_peft_model_state_dict(model)
    meta = _collate_lora_metadata({"transformer": model}) if metadata else {}
    DiffusersSanaPipeline.save_lora_weights(folder, transformer_lora_layers=layers, **meta)
    return f"{folder}/pytorch_lora_weights.safetensors"


def with_loras(base, *loras):
    """diffusers' output function with LoRAs loaded by its own loader: (path, strength) pairs."""
    model = copy.deepcopy(base)
    names = []
    for i, (path, _) in enumerate(loras):
        state_dict, metadata = DiffusersSanaPipeline.lora_state_dict(path, return_lora_metadata=True)
        DiffusersSanaPipeline.load_lora_into_transformer(state_dict, transformer=model, adapter_name=f"l{i}",
                                                         metadata=metadata)
        names.append(f"l{i}")
    model.set_adapters(names, weights=[s for _, s in loras])
    return model


def inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 32, 3, 5, generator=g)
    context = torch.randn(batch, 7, CAPTION, generator=g)
    mask = torch.ones(batch, 7, dtype=torch.long)
    mask[1, 4:] = 0
    return x, context, mask


def ours_out(model):
    x, context, mask = inputs()
    with torch.no_grad():
        return model(x, torch.tensor([730.0, 50.0]), context, mask)


def theirs_out(model):
    x, context, mask = inputs()
    with torch.no_grad():
        return model(x, context, timestep=torch.tensor([730, 50]), encoder_attention_mask=mask).sample


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The diffusers base model, ours loaded from its saved folder, and LoRAs: `all` targets every mergeable
    module with per-module rank and alpha patterns; `kv-bias` has PEFT's lora_bias on the cross-attention k/v
    (biased layers); `qkv-no-metadata` is the training script's default targets saved without the LoraConfig
    (diffusers then takes alpha = rank), lora_alpha != rank to show it is ignored."""
    tmp = tmp_path_factory.mktemp("lora")
    base = diffusers_dit()
    base.save_pretrained(tmp / "dit")
    ours = load_transformer(tmp / "dit", dtype=torch.float32, device="cpu")
    loras = {
        "all": save_peft_lora(tmp / "all", base, seed=1, r=4, lora_alpha=8, target_modules=ALL_TARGETS,
                              rank_pattern={"to_k": 2}, alpha_pattern={"conv_point": 3.0}),
        "kv-bias": save_peft_lora(tmp / "kv-bias", base, seed=2, r=4, lora_alpha=4,
                                  target_modules=["attn2.to_k", "attn2.to_v"], lora_bias=True),
        "qkv-no-metadata": save_peft_lora(tmp / "nometa", base, seed=3, r=3, lora_alpha=6,
                                      target_modules=["to_q", "to_k", "to_v"], metadata=False),
    }
    return base, ours, loras, tmp


@pytest.fixture
def model(setup):
    _, ours, _, _ = setup
    yield ours
    unload_loras(ours)


@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
@pytest.mark.parametrize("name", ["all", "kv-bias", "qkv-no-metadata"])
def test_peft_lora_equals_diffusers(setup, model, name, strength):
    base, _, loras, _ = setup
    plain = ours_out(model)
    lora = apply_lora(model, loras[name], strength)
    assert lora.format == "diffusers / PEFT LoRA (diffusers names)" and not lora.unmatched
    ours, theirs = ours_out(model), theirs_out(with_loras(base, (loras[name], strength)))
    assert rel_err(ours, theirs) < 1e-5
    assert rel_err(plain, theirs) > 1e-2  # the LoRA changes the output


def test_peft_adapter_folder_equals_the_peft_model(setup, model, tmp_path):
    """PEFT's own save_pretrained folder (adapter_model.safetensors, base_model.model. keys, alpha in
    adapter_config.json), against the PeftModel's output."""
    base, _, _, _ = setup
    torch.manual_seed(6)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=12, init_lora_weights=False,
                                                               target_modules=["to_q", "to_v", "conv_point"]))
    peft_model.save_pretrained(tmp_path)
    lora = apply_lora(model, tmp_path)
    assert len(lora.updates) == 10 and not lora.unmatched  # q, v of both attentions + conv_point, 2 blocks
    assert rel_err(ours_out(model), theirs_out(peft_model.base_model.model)) < 1e-5


def test_every_trainable_module_is_targeted(setup, model):
    _, _, loras, _ = setup
    keys = read_lora(loras["all"], model).keys()
    for key in ("blocks.0.attn.qkv.weight", "blocks.1.attn.proj.weight", "blocks.0.cross_attn.q_linear.weight",
                "blocks.0.cross_attn.kv_linear.weight", "blocks.0.cross_attn.proj.weight",
                "blocks.0.mlp.inverted_conv.conv.weight", "blocks.1.mlp.point_conv.conv.weight",
                "y_embedder.y_proj.fc1.weight", "y_embedder.y_proj.fc2.weight", "t_embedder.mlp.0.weight",
                "t_embedder.mlp.2.weight", "t_block.1.weight", "x_embedder.proj.weight", "final_layer.linear.weight"):
        assert key in keys
    assert "blocks.0.cross_attn.kv_linear.bias" in read_lora(loras["kv-bias"], model).keys()  # lora_B.bias


# ----------------------------------------------------------------------------- the other forms

def original_names(cfg: SanaConfig) -> dict:
    """diffusers module -> (original module, first row), found by diffusers' converter: every original
    weight's rows hold (its index, row number)."""
    sd = random_state_dict(cfg)
    sd["pos_embed"], sd["y_embedder.y_embedding"] = torch.zeros(1, 16, cfg.width), torch.zeros(300, cfg.caption_dim)
    weights = sorted(k for k, v in sd.items() if k.endswith(".weight") and v.dim() >= 2)
    for i, key in enumerate(weights):
        rows = sd[key].shape[0]
        sd[key] = (i * 100000 + torch.arange(rows, dtype=torch.float64)).reshape(rows, *[1] * (sd[key].dim() - 1))
    out = {}
    for name, t in convert_sana_transformer_to_diffusers(sd).items():
        if name.endswith(".weight") and t.dim() >= 2:
            tag = int(t.flatten()[0])
            out[name[:-len(".weight")]] = (weights[tag // 100000][:-len(".weight")], tag % 100000)
    return out


def rewrite(path, form: str, cfg: SanaConfig, out_path) -> str:
    """The PEFT file's LoRA in another form: kohya / OneTrainer (diffusers names underscored), or the
    original names (q/k/v and k/v fused: down factors stacked, up factors block-diagonal), as PEFT
    (lora_A/B) or as kohya under ComfyUI's lora_unet_, or named as ComfyUI names our DiT in its MODEL (what its
    Extract and Save LoRA node writes, and that name's kohya form). Scales are kept with `.alpha` tensors."""
    tensors = load_file(path)  # made with alpha = rank: scale 1
    modules = sorted({k[len("transformer."):].rsplit(".lora_", 1)[0] for k in tensors})
    factors = {m: (tensors[f"transformer.{m}.lora_B.weight"], tensors[f"transformer.{m}.lora_A.weight"])
               for m in modules}
    out = {}
    if form == "kohya":
        for m, (up, down) in factors.items():
            name = "lora_transformer_" + m.replace(".", "_")
            out[f"{name}.lora_up.weight"], out[f"{name}.lora_down.weight"] = up, down
            out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    else:
        names, fused = original_names(cfg), {}
        for m, (up, down) in factors.items():
            original, row = names[m]
            fused.setdefault(original, []).append((row, up, down))
        for original, parts in fused.items():
            parts.sort(key=lambda p: p[0])
            down = torch.cat([d for _, _, d in parts])  # (sum of ranks, in)
            rows = sum(u.shape[0] for _, u, _ in parts)  # the test targets every part of a fused tensor
            up = torch.zeros(rows, down.shape[0], *parts[0][1].shape[2:])
            r = 0
            for row, u, d in parts:
                up[row:row + u.shape[0], r:r + d.shape[0]] = u
                r += d.shape[0]
            alpha = torch.tensor(float(down.shape[0]))  # alpha = total rank: scale 1, as the PEFT file's
            if form == "original":
                out[f"{original}.lora_A.weight"], out[f"{original}.lora_B.weight"] = down, up
                out[f"{original}.alpha"] = alpha
            else:
                name = {"original-comfy-kohya": "lora_unet_" + original.replace(".", "_"),
                        "comfyui": "diffusion_model.transformer." + original,
                        "comfyui-kohya": "lora_unet_transformer_" + original.replace(".", "_")}[form]
                out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
                out[f"{name}.alpha"] = alpha
    save_file(out, out_path)
    return out_path


@pytest.mark.parametrize("form, expected", [
    ("kohya", "kohya / OneTrainer LoRA"),
    ("original", "diffusers / PEFT LoRA (original NVlabs names)"),
    ("original-comfy-kohya", "kohya LoRA (original NVlabs names)"),
    ("comfyui", "kohya LoRA (original NVlabs names)"),
    ("comfyui-kohya", "kohya LoRA (original NVlabs names)"),
])
def test_other_forms_equal_diffusers_loading_the_peft_form(setup, model, form, expected, tmp_path):
    base, _, loras, _ = setup
    peft_file = save_peft_lora(tmp_path / "peft", base, seed=4, r=4, lora_alpha=4,
                               target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv_inverted", "conv_point"])
    path = rewrite(peft_file, form, model.config, str(tmp_path / f"{form}.safetensors"))
    lora = apply_lora(model, path, 0.7)
    assert lora.format == expected and not lora.unmatched
    assert rel_err(ours_out(model), theirs_out(with_loras(base, (peft_file, 0.7)))) < 1e-5


# ----------------------------------------------------------------------------- stacking and unloading

def test_two_loras_stacked_equal_diffusers_with_both_adapters(setup, model):
    base, _, loras, _ = setup
    apply_lora(model, loras["all"], 0.8)
    apply_lora(model, loras["kv-bias"], -0.6)
    theirs = theirs_out(with_loras(base, (loras["all"], 0.8), (loras["kv-bias"], -0.6)))
    assert rel_err(ours_out(model), theirs) < 1e-5


def test_strength_zero_removal_and_unloading_restore_bit_for_bit(setup, model):
    _, _, loras, _ = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = ours_out(model)
    zero = apply_lora(model, loras["all"], 0.0)
    assert torch.equal(ours_out(model), plain)
    first = apply_lora(model, loras["kv-bias"], 1.0)
    only_first = ours_out(model)
    second = apply_lora(model, loras["all"], 0.5)
    remove_lora(model, second)
    assert torch.equal(ours_out(model), only_first)  # recomputed from the originals: no rounding drift
    remove_lora(model, first)
    remove_lora(model, zero)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    apply_lora(model, loras["all"], 1.0)
    apply_lora(model, loras["kv-bias"], 0.3)
    unload_loras(model)
    assert torch.equal(ours_out(model), plain)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.merged_loras.originals


def test_half_precision_weights_merge_and_unload_exactly(setup):
    """bfloat16 weights: the merge lands within bfloat16 rounding of the float32 merge; unloading gives
    the bfloat16 originals back bit for bit (they were kept, not recomputed by subtraction)."""
    _, _, loras, tmp = setup
    half = load_transformer(tmp / "dit", dtype=torch.bfloat16, device="cpu")
    full = load_transformer(tmp / "dit", dtype=torch.float32, device="cpu")
    before = {k: v.clone() for k, v in half.state_dict().items()}
    apply_lora(half, loras["all"], 0.9)
    apply_lora(full, loras["all"], 0.9)
    key = "blocks.0.attn.qkv.weight"
    merged, reference, original = half.state_dict()[key], full.state_dict()[key], before[key].float()
    assert merged.dtype == torch.bfloat16 and not torch.equal(merged, before[key])
    assert ((merged.float() - reference).abs() <= 2 ** -8 * (reference.abs() + original.abs())).all()
    unload_loras(half)
    assert all(torch.equal(v, before[k]) for k, v in half.state_dict().items())


def test_merging_keeps_weight_addresses_so_cuda_graphs_replay_the_merged_weights(setup, model):
    """A captured CUDA graph reads the weights' memory at every replay: merging in place keeps every
    weight's address, dtype and device (what the graph cache fingerprints), so a cached graph replays the
    merged values without a re-capture, and the originals come back into the same memory."""
    _, _, loras, _ = setup

    def places():
        return [(p.data_ptr(), p.dtype, p.device, p.shape) for p in model.parameters()]
    before = places()
    apply_lora(model, loras["all"], 1.0)
    assert places() == before
    unload_loras(model)
    assert places() == before


# ----------------------------------------------------------------------------- files that do not fit

def test_keys_that_match_nothing_are_reported_by_name(setup, model, tmp_path, caplog):
    _, _, loras, _ = setup
    tensors = load_file(loras["kv-bias"])
    tensors["text_encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 8)
    tensors["transformer.transformer_blocks.1.ff.conv_depth.lora_A.weight"] = torch.zeros(4, 1, 3, 3)  # grouped conv
    save_file(tensors, tmp_path / "extra.safetensors")
    lora = read_lora(tmp_path / "extra.safetensors", model)
    assert lora.unmatched == ["text_encoder.layers.0.self_attn.q_proj.lora_A.weight",
                              "transformer.transformer_blocks.1.ff.conv_depth.lora_A.weight"]
    assert "transformer_blocks.1.ff.conv_depth" in caplog.text
    assert len(lora.updates) == 4  # attn2 to_k / to_v of both blocks still apply
    tensors["transformer.transformer_blocks.7.attn1.to_q.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, tmp_path / "deeper.safetensors")
    with pytest.raises(CheckpointError, match="deeper SANA model: it has LoRA factors for block 7, this model has "
                                              "blocks 0..1"):
        read_lora(tmp_path / "deeper.safetensors", model)


@pytest.mark.parametrize("keys, message", [
    ({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": (4, 64)}, "LoRA for Flux"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 64)}, "LoRA for SD 1.x / SDXL"),
    ({"blocks.0.attn.qkv.weight": (192, 64)}, "not a LoRA"),
])
def test_a_file_for_another_family_is_one_clear_error(model, tmp_path, keys, message):
    save_file({k: torch.zeros(s) for k, s in keys.items()}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=message):
        read_lora(tmp_path / "other.safetensors", model)


def test_a_lora_for_another_sana_width_is_refused_with_the_shapes(model, tmp_path):
    wide = diffusers_dit(heads=3)  # width 96
    path = save_peft_lora(tmp_path, wide, seed=5, r=4, lora_alpha=4, target_modules=["to_q"])
    with pytest.raises(CheckpointError, match=r"up \[96, 4\] x down \[4, 96\].*blocks.0.attn.qkv.weight rows "
                                              r"0..63 is 64 x 64.*width 64"):
        read_lora(path, model)


def test_nan_factors_are_a_clear_error_and_a_failed_merge_changes_nothing(setup, model, tmp_path, monkeypatch):
    _, _, loras, _ = setup
    tensors = load_file(loras["kv-bias"])
    tensors["transformer.transformer_blocks.1.attn2.to_v.lora_B.weight"][0, 0] = float("nan")
    save_file(tensors, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="damaged.*transformer_blocks.1.attn2.to_v.*NaN"):
        read_lora(tmp_path / "nan.safetensors", model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = apply_lora(model, loras["kv-bias"], 1.0)
    with_first = {k: v.clone() for k, v in model.state_dict().items()}
    lora = read_lora(loras["all"], model)
    calls = []

    def fail_once(self, key, device):  # out of memory part way through the merge
        calls.append(key)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("simulated")
        return real(self, key, device)
    real = type(lora.updates[0]).delta
    monkeypatch.setattr(type(lora.updates[0]), "delta", fail_once)
    with pytest.raises(torch.OutOfMemoryError):
        apply_lora(model, lora, 1.0)
    monkeypatch.undo()
    assert [a for a, _ in model.merged_loras.applied] == [first]
    assert all(torch.equal(v, with_first[k]) for k, v in model.state_dict().items())
    unload_loras(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("suffixes, name", [
    (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"), "LyCORIS LoHa"),
    (("lokr_w1", "lokr_w2", "alpha"), "LyCORIS LoKr"),
    (("lora_down.weight", "lora_up.weight", "dora_scale"), "DoRA"),
])
def test_loha_lokr_dora_are_named(model, tmp_path, suffixes, name):
    module = "lora_transformer_transformer_blocks_0_attn1_to_q"
    save_file({f"{module}.{s}": torch.ones(4, 4) for s in suffixes}, tmp_path / "lycoris.safetensors")
    with pytest.raises(CheckpointError, match=f"is a {name} file.*ComfyUI"):
        read_lora(tmp_path / "lycoris.safetensors", model)


# ----------------------------------------------------------------------------- pipeline and demo file

def test_pipeline_load_lora_and_unload(setup, model):
    base, _, loras, _ = setup
    pipe = SanaPipeline(model, None, None)
    plain = ours_out(model)
    pipe.load_lora(loras["all"], 0.5)
    pipe.load_lora(loras["kv-bias"])
    theirs = theirs_out(with_loras(base, (loras["all"], 0.5), (loras["kv-bias"], 1.0)))
    assert rel_err(ours_out(model), theirs) < 1e-5
    pipe.unload_loras()
    assert torch.equal(ours_out(model), plain)


def test_demo_lora_is_a_diffusers_lora_for_the_demo_model(tmp_path):
    from sana_core.demo import DEMO_CAPTION_DIM, write_demo_lora, write_demo_transformer

    ours = load_transformer(write_demo_transformer(tmp_path / "dit.safetensors"), dtype=torch.float32, device="cpu")
    path = write_demo_lora(tmp_path / "demo_lora.safetensors")
    tensors = load_file(path)
    assert tensors and all(k.startswith("transformer.transformer_blocks.") for k in tensors)
    state_dict, metadata = DiffusersSanaPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    reference = diffusers_dit(caption=DEMO_CAPTION_DIM)  # diffusers accepts its names and shapes
    DiffusersSanaPipeline.load_lora_into_transformer(state_dict, transformer=reference, metadata=metadata)
    assert metadata["transformer.r"] == 4 and reference.peft_config
    lora = apply_lora(ours, path)
    assert lora.format == "diffusers / PEFT LoRA (diffusers names)" and not lora.unmatched
    assert {u.target.key for u in lora.updates} >= {"blocks.0.attn.qkv.weight", "blocks.1.cross_attn.kv_linear.weight"}
