"""Quantized DiT weights (sana_core.quantized, quantized_files, kernels.dequant): GGUF and fp8 files load,
stay quantized in memory and compute what their stored values say.

The readers under test are checked by independent ones: gguf's GGUFReader and gguf.quants.dequantize for
GGUF (the K-quant blocks, which gguf cannot write, are encoded by this test's own encoders from float data
and decoded by gguf), ComfyUI's scaled-fp8 rule (weight = fp8 x scale_weight) read straight from the file
with safetensors. Each format's own error, measured on these random weights (relative L2 of a weight, the
largest over the layers): fp8 e4m3fn 2.7%, Q8_0 0.55%, Q5_0 4.35%, Q4_0 8.85%; the bounds sit just above.
"""
import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import rel_err
from sana_core import CheckpointError, kernels as K
from sana_core.__main__ import main as cli
from sana_core.kernels.dequant import FORMATS
from sana_core.quantized import QuantizedTensor, quantization_summary, quantized_ops
from sana_core.quantized_files import TOOL, quantize_checkpoint
from sana_core.transformer import SanaConfig, config_metadata, load_transformer, random_state_dict

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

TINY = SanaConfig(depth=2, width=64, caption_dim=48, self_heads=2, cross_heads=2, mlp_hidden=160)
WIDE = SanaConfig(depth=1, width=256, caption_dim=48, self_heads=8, cross_heads=2, mlp_hidden=256)  # K-quant rows
CPU = dict(dtype=torch.float32, device="cpu")
WEIGHT_ERR = {"fp8": 0.03, "q8_0": 0.006, "q5_0": 0.046, "q4_0": 0.092}  # bound on a weight's relative error
MATRICES = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
            "mlp.inverted_conv.conv", "mlp.point_conv.conv")  # per block: what the writers quantize
RUNS_TRITON = K.HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def run(model, batch=2, h=3, w=5):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 32, h, w, generator=g)
    context = torch.randn(batch, 6, model.config.caption_dim, generator=g)
    with torch.no_grad():
        return model(x, torch.full((batch,), 500.0), context, torch.ones(batch, 6))


def save(path, cfg=TINY, sd=None):
    save_file(sd or random_state_dict(cfg), path, metadata=config_metadata(cfg))
    return path


def layer(model, name):
    return model.get_submodule(name)


def float_model_with(sd, cfg=TINY):
    """The plain float model with these (already dequantized) original-named weights."""
    from sana_core.transformer import SanaTransformer
    model = SanaTransformer(cfg).eval()
    model.load_state_dict(sd)
    return model


# ----------------------------------------------------------------------------- block encoders (K-quants)

def _f16(x):
    return x.astype(np.float16)


def encode_q4k_q5k(x, bits):
    """(n, 256) float -> Q4_K (bits 4) or Q5_K (bits 5) blocks: 8 sub-blocks of 32 with a 6-bit scale and
    min each (x = d * sc * q - dmin * m), q rounded to nearest."""
    n, top = x.shape[0], 2 ** bits - 1
    sub = x.reshape(n, 8, 32).astype(np.float32)
    lo = np.minimum(sub.min(-1), 0)
    scale, mins = (sub.max(-1) - lo) / top, -lo
    d, dmin = _f16(scale.max(-1) / 63), _f16(mins.max(-1) / 63)
    sc = np.clip(np.rint(scale / np.where(d == 0, 1, d)[:, None].astype(np.float32)), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(mins / np.where(dmin == 0, 1, dmin)[:, None].astype(np.float32)), 0, 63).astype(np.uint8)
    step = d.astype(np.float32)[:, None] * sc
    offset = dmin.astype(np.float32)[:, None] * m
    q = np.clip(np.rint((sub + offset[..., None]) / np.where(step == 0, 1, step)[..., None]), 0, top)
    q = q.astype(np.uint8)
    scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], axis=1)
    nibbles = (q[:, 0::2] & 15) | ((q[:, 1::2] & 15) << 4)  # (n, 4, 32): sub-blocks 2g (low) and 2g+1 (high)
    parts = [d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), scales]
    if bits == 5:
        parts.append(sum(((q[:, s] >> 4) & 1) << s for s in range(8)).astype(np.uint8))  # (n, 32)
    parts.append(nibbles.reshape(n, 128))
    return np.concatenate(parts, axis=1)


def encode_q6k(x):
    """(n, 256) float -> Q6_K blocks: 16 sub-blocks of 16 with an int8 scale each, q in -32..31."""
    n = x.shape[0]
    sub = x.reshape(n, 16, 16).astype(np.float32)
    scale = np.abs(sub).max(-1) / 31
    d = _f16(scale.max(-1) / 127)
    sc = np.clip(np.rint(scale / np.where(d == 0, 1, d)[:, None].astype(np.float32)), -128, 127).astype(np.int8)
    step = d.astype(np.float32)[:, None] * sc
    q = (np.clip(np.rint(sub / np.where(step == 0, 1, step)[..., None]), -32, 31) + 32).astype(np.uint8)
    q = q.reshape(n, 2, 128)  # halves g of 128 values
    ql = (q[:, :, :64] & 15) | ((q[:, :, 64:] & 15) << 4)  # (n, 2, 64)
    qh = sum(((q[:, :, 32 * k:32 * k + 32] >> 4) & 3) << (2 * k) for k in range(4)).astype(np.uint8)  # (n, 2, 32)
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), d[:, None].view(np.uint8)],
                          axis=1)


def encode(x, fmt):
    """(rows, cols) float32 -> (rows, bytes) in `fmt`: gguf's quantizer where it has one, else ours."""
    rows = x.shape[0]
    if fmt in ("Q4_K", "Q5_K"):
        return encode_q4k_q5k(x.reshape(-1, 256), 4 if fmt == "Q4_K" else 5).reshape(rows, -1)
    if fmt == "Q6_K":
        return encode_q6k(x.reshape(-1, 256)).reshape(rows, -1)
    return gguf.quants.quantize(x, Q[fmt])


def random_blocks(fmt, n, seed=0):
    """n blocks of random bytes (every bit pattern), with finite, moderate float16 scales."""
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (n, FORMATS[fmt][1]), dtype=np.uint8)
    for offset in {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}.get(fmt, (0,)):
        b[:, offset:offset + 2] = _f16(rng.standard_normal(n) * 0.05)[:, None].view(np.uint8)
    return b


# ----------------------------------------------------------------------------- the dequantization itself

@pytest.mark.parametrize("fmt", FORMATS)
def test_twin_decodes_every_bit_as_gguf_does(fmt):
    blocks = random_blocks(fmt, 7)
    ref = gguf.quants.dequantize(blocks.reshape(1, -1), Q[fmt]).reshape(-1)
    assert np.array_equal(K.dequantize_blocks_torch(torch.from_numpy(blocks), fmt).numpy(), ref)


@pytest.mark.parametrize("fmt", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_encoders_are_what_gguf_reads(fmt):
    """This test's K-quant encoders (the writers of the K-quant files below) decode, by gguf, to their input
    within the format's resolution; our twin decodes them exactly as gguf does."""
    x = np.random.default_rng(1).standard_normal((6, 512)).astype(np.float32)
    blocks = encode(x, fmt)
    theirs = gguf.quants.dequantize(blocks, Q[fmt])
    assert theirs.shape == x.shape
    assert rel_err(torch.from_numpy(theirs), torch.from_numpy(x)) < {"Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03}[fmt]
    assert np.array_equal(K.dequantize_blocks_torch(torch.from_numpy(blocks), fmt).numpy().reshape(x.shape), theirs)


@pytest.mark.skipif(not RUNS_TRITON, reason="Triton missing, or no GPU and no TRITON_INTERPRET=1")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernel_equals_its_twin(fmt, dtype, monkeypatch):
    """Odd block counts (a partial last program); outputs start as NaN, so a value left unwritten fails."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    for n in (1, 37):
        data = torch.from_numpy(random_blocks(fmt, n, seed=n)).to(device)
        ours = K.dequantize_blocks_triton(data, fmt, dtype)
        assert ours.shape == (n * FORMATS[fmt][0],) and ours.dtype == dtype
        assert torch.equal(ours, K.dequantize_blocks_torch(data, fmt, dtype))


@pytest.mark.skipif(not RUNS_TRITON, reason="Triton missing, or no GPU and no TRITON_INTERPRET=1")
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("scale", ["none", "tensor", "row"])
def test_fp8_kernel_equals_its_twin(fp8, scale):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = (torch.randn(37, 3, 1, 1, device=device) * 30).to(fp8)  # a 1x1 conv weight; a partial program
    s = {"none": None, "tensor": torch.tensor(0.013), "row": torch.rand(37) + 0.5}[scale]
    for dtype in (torch.float32, torch.float16):
        ours = K.dequantize_fp8_triton(data, s, dtype)
        assert ours.shape == data.shape and ours.dtype == dtype
        assert torch.equal(ours, K.dequantize_fp8_torch(data, None if s is None else s.to(device), dtype))


# ----------------------------------------------------------------------------- written by our writer

@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The tiny model's float checkpoint and its four quantized files, written by the command."""
    d = tmp_path_factory.mktemp("quantized")
    source = save(d / "sana_tiny.safetensors")
    files = {}
    for fmt in WEIGHT_ERR:
        files[fmt] = d / f"sana_tiny_{fmt}.{'safetensors' if fmt == 'fp8' else 'gguf'}"
        assert cli(["quantize", str(source), str(files[fmt]), "--format", fmt]) == 0
    return source, files


@pytest.mark.parametrize("fmt", ["q8_0", "q5_0", "q4_0"])
def test_gguf_round_trip(written, fmt):
    """gguf's reader sees the blocks' matrices in the format (1x1 convs as matrices with their shape in
    comfy.gguf.orig_shape), the rest as float32, and the tool named; each loaded layer holds the file's
    bytes and computes with exactly what gguf decodes; those are the float weights within the format's error."""
    source, files = written
    reader = gguf.GGUFReader(str(files[fmt]))
    sd = random_state_dict(TINY)
    assert reader.get_field("general.quantized_by").contents() == TOOL
    assert reader.get_field("general.architecture").contents() == "sana"
    assert json.loads(reader.get_field("sana.config").contents())["mlp_hidden"] == TINY.mlp_hidden
    model = load_transformer(files[fmt], **CPU)
    assert quantization_summary(model) == {fmt.upper(): len(MATRICES) * TINY.depth}
    decoded = {}
    for t in reader.tensors:
        m = re.fullmatch(r"blocks\.\d+\.(.+)\.weight", t.name)
        quantized = m is not None and m[1] in MATRICES
        assert t.tensor_type == (Q[fmt.upper()] if quantized else Q.F32), t.name
        values = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(sd[t.name].shape)
        decoded[t.name] = values
        if quantized:
            held = layer(model, t.name.rpartition(".")[0])
            assert held.weight.dtype == torch.uint8 and held.weight.numel() == t.n_bytes  # kept as stored
            assert torch.equal(held.dequantized_weight(torch.float32, "cpu"), values)
            assert rel_err(values, sd[t.name]) < WEIGHT_ERR[fmt]
        else:
            assert torch.equal(values, sd[t.name])
    assert torch.equal(run(model), run(float_model_with(decoded)))
    float_out = run(load_transformer(source, **CPU))
    assert rel_err(run(model), float_out) < 2 * WEIGHT_ERR[fmt]


def test_fp8_round_trip_follows_comfyui_rule(written):
    """The fp8 file read straight with safetensors: the scaled_fp8 marker (e4m3fn), the blocks' matrices in
    e4m3fn each with a float32 scale_weight, the rest unchanged; loaded layers keep the fp8 bytes and compute
    with ComfyUI's weight x scale; that is the float weight within fp8's error."""
    source, files = written
    sd = random_state_dict(TINY)
    model = load_transformer(files["fp8"], **CPU)
    assert quantization_summary(model) == {"fp8_e4m3fn": len(MATRICES) * TINY.depth}
    with safe_open(str(files["fp8"]), "pt") as f:
        assert f.metadata()["quantized_by"] == TOOL and "config" in f.metadata()
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert stored.pop("scaled_fp8").dtype == torch.float8_e4m3fn
    comfy = {}
    for name, t in stored.items():
        if name.endswith(".scale_weight"):
            continue
        scale = stored.get(name[:-len("weight")] + "scale_weight")
        if scale is None:
            assert t.dtype == torch.float32 and torch.equal(t, sd[name]), name
            comfy[name] = t
            continue
        assert t.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.numel() == 1
        comfy[name] = t.float() * scale  # ComfyUI's scaled fp8 rule
        held = layer(model, name.rpartition(".")[0])
        assert held.weight.dtype == torch.float8_e4m3fn
        assert torch.equal(held.dequantized_weight(torch.float32, "cpu"), comfy[name])
        assert rel_err(comfy[name], sd[name]) < WEIGHT_ERR["fp8"]
    assert set(comfy) == set(sd)
    assert torch.equal(run(model), run(float_model_with(comfy)))
    assert rel_err(run(model), run(load_transformer(source, **CPU))) < 2 * WEIGHT_ERR["fp8"]


def test_half_precision_compute(written):
    _, files = written
    for fmt in ("fp8", "q8_0"):
        out32 = run(load_transformer(files[fmt], **CPU))
        model = load_transformer(files[fmt], dtype=torch.bfloat16, device="cpu")
        assert model.dtype == torch.bfloat16
        assert rel_err(run(model), out32) < 0.03


def test_quantize_command_keeps_the_resolution_hint(written, tmp_path):
    source, _ = written
    assert cli(["quantize", str(source), str(tmp_path / "q.gguf"), "--format", "q8_0", "--resolution", "4096"]) == 0
    model = load_transformer(tmp_path / "q.gguf", **CPU)  # the file name says nothing: the metadata does
    assert (model.config.pe_interpolation, model.config.base_size) == (2.0, 128)


def test_quantize_command_refuses_bad_input(written, tmp_path, capsys):
    source, files = written
    assert cli(["quantize", str(files["q8_0"]), str(tmp_path / "again.gguf"), "--format", "q4_0"]) == 2
    assert "already quantized (GGUF Q8_0)" in capsys.readouterr().err
    assert cli(["quantize", str(source), str(tmp_path / "x.safetensors"), "--format", "q8_0"]) == 2
    assert "name the output e.g. x.gguf" in capsys.readouterr().err
    with pytest.raises(ValueError, match="format must be one of"):
        quantize_checkpoint(source, tmp_path / "x.gguf", "q2_k")


# ----------------------------------------------------------------------------- files written elsewhere

def write_gguf(path, tensors: dict, orig_shapes=None, arch="sana", metadata=None):
    """tensors: name -> (array, GGML type): float arrays are stored as they are, uint8 as raw blocks."""
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)
    for name, shape in (orig_shapes or {}).items():
        writer.add_array("comfy.gguf.orig_shape." + name, list(shape))
    for name, (array, qtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=qtype if array.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_tensors(sd, fmt_of, prefix=""):
    """Original-named float weights -> GGUF entries (1x1 convs as matrices) and the shapes to record;
    fmt_of(name, tensor) gives a format name or None (float32)."""
    tensors, shapes = {}, {}
    for name, t in sd.items():
        fmt = fmt_of(name, t)
        if fmt is None:
            tensors[prefix + name] = (t.numpy(), None)
            continue
        if t.ndim == 4:
            shapes[prefix + name] = t.shape
        tensors[prefix + name] = (encode(t.reshape(t.shape[0], -1).numpy(), fmt), Q[fmt])
    return tensors, shapes


def decoded(path):
    """name -> float32 tensor, as gguf decodes the file (shapes from the orig_shape entries)."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        field = reader.get_field("comfy.gguf.orig_shape." + t.name)
        shape = field.contents() if field else list(reversed([int(n) for n in t.shape]))
        out[t.name] = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(shape)
    return out


def is_matrix(name, t):
    return name.startswith("blocks.") and name.endswith(".weight") and (t.ndim == 2 or t.shape[2:] == (1, 1))


@pytest.mark.parametrize("fmt", ["Q4_K", "Q5_K", "Q6_K", "Q8_0"])
def test_k_quant_files_compute_what_gguf_decodes(tmp_path, fmt):
    """GGUF files with K-quant blocks (written with this test's encoders), ComfyUI-prefixed keys, other
    tensors in F16: loaded layers keep the blocks and the model equals the float model of gguf's decode."""
    sd = random_state_dict(WIDE)
    tensors, shapes = gguf_tensors(sd, lambda n, t: fmt if is_matrix(n, t) else None, "model.diffusion_model.")
    tensors = {k: (a.astype(np.float16) if a.dtype == np.float32 else a, q) for k, (a, q) in tensors.items()}
    meta = {"sana.config": config_metadata(WIDE)["config"]}
    path = write_gguf(tmp_path / "wide.gguf", tensors, shapes, metadata=meta)
    model = load_transformer(path, **CPU)
    assert quantization_summary(model) == {fmt: len(MATRICES)}
    ref = {k[len("model.diffusion_model."):]: v for k, v in decoded(path).items()}
    assert rel_err(run(model), run(float_model_with(ref, WIDE))) < 1e-5


@pytest.mark.parametrize("fmt", ["F16", "BF16"])
def test_float_gguf_loads_as_float(tmp_path, fmt):
    sd = random_state_dict(TINY)
    tensors = {}
    for name, t in sd.items():
        half = t.to(torch.float16 if fmt == "F16" else torch.bfloat16)
        tensors[name] = (half.view(torch.uint8).numpy(), Q[fmt]) if fmt == "BF16" else (half.numpy(), None)
    model = load_transformer(write_gguf(tmp_path / "half.gguf", tensors, metadata={
        "sana.config": config_metadata(TINY)["config"]}), **CPU)
    assert quantization_summary(model) == {}
    ref = {k: v.to(torch.float16 if fmt == "F16" else torch.bfloat16).float() for k, v in sd.items()}
    assert rel_err(run(model), run(float_model_with(ref))) < 1e-6
    half = load_transformer(tmp_path / "half.gguf", dtype=torch.float16 if fmt == "F16" else torch.bfloat16,
                            device="cpu")  # the weights are the file's memory map (no copy) ...
    half.blocks[0].attn.qkv.weight.add_(1)  # ... copy-on-write: in-place patches (ComfyUI's) do not crash


def to_diffusers(sd):
    """diffusers' own converter (an independent name map)."""
    diffusers = pytest.importorskip("diffusers")  # noqa: F841
    from diffusers.loaders.single_file_utils import convert_sana_transformer_to_diffusers
    extras = {"pos_embed": torch.zeros(1, 16, TINY.width), "y_embedder.y_embedding": torch.zeros(1, TINY.caption_dim)}
    return convert_sana_transformer_to_diffusers({**sd, **extras})


def test_diffusers_keyed_gguf_fuses_qkv(tmp_path):
    """diffusers names: separate to_q/to_k/to_v (to_k/to_v) Q8_0 tensors fuse into one Q8_0 layer by joining
    their rows (exact); a file whose to_v is F16 instead fuses by dequantizing (the layer is then float)."""
    sd = random_state_dict(TINY)
    theirs = to_diffusers(sd)
    meta = {"sana.config": config_metadata(TINY)["config"]}
    for name, v_format in (("same", "Q8_0"), ("mixed", None)):
        def fmt_of(n, t):
            if n.endswith("attn1.to_v.weight"):
                return v_format
            return "Q8_0" if n.startswith("transformer_blocks.") and n.endswith("weight") and t.ndim in (2, 4) \
                and t.shape[-1] in (1, TINY.width, TINY.mlp_hidden) and "conv_depth" not in n else None
        tensors, shapes = gguf_tensors(theirs, fmt_of)
        path = write_gguf(tmp_path / f"{name}.gguf", tensors, shapes, metadata=meta)
        model = load_transformer(path, **CPU)
        ref = to_original_float(decoded(path), sd)
        assert rel_err(run(model), run(float_model_with(ref))) < 1e-6
        qkv = model.blocks[0].attn.qkv
        assert getattr(qkv, "qtype", None) == ("Q8_0" if name == "same" else None)  # mixed: a float layer
        assert model.blocks[0].cross_attn.kv_linear.qtype == "Q8_0"


def to_original_float(theirs_decoded, sd):
    """diffusers-named decoded tensors -> original names (q/k/v, k/v concatenated), as the oracle's."""
    from sana_core.transformer import diffusers_to_original
    fused = diffusers_to_original(theirs_decoded)
    return {k: fused[k] for k in sd}


def test_diffusers_keyed_scaled_fp8_keeps_each_part_scale(tmp_path):
    """diffusers-named scaled fp8 with a different scale per q/k/v part: the fused layer keeps one scale per
    row (exact), and equals ComfyUI's weight x scale of each part."""
    sd = random_state_dict(TINY)
    theirs = to_diffusers(sd)
    out, comfy = {}, {}
    for i, (name, t) in enumerate(theirs.items()):
        if name.startswith("transformer_blocks.") and name.endswith(".weight") and t.ndim == 2:
            scale = (t.abs().max() / 448 * (1 + i % 3)).float()
            out[name] = (t / scale).to(torch.float8_e4m3fn)
            out[name[:-len("weight")] + "scale_weight"] = scale
            comfy[name] = out[name].float() * scale
        else:
            out[name] = comfy[name] = t
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(out, tmp_path / "fp8_diffusers.safetensors", metadata=config_metadata(TINY))
    model = load_transformer(tmp_path / "fp8_diffusers.safetensors", **CPU)
    qkv = model.blocks[0].attn.qkv
    assert qkv.qtype == "fp8_e4m3fn" and qkv.scale_weight.shape == (3 * TINY.width,)
    assert rel_err(run(model), run(float_model_with(to_original_float(comfy, sd)))) < 1e-6


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_plain_fp8_stays_fp8(tmp_path, fp8):
    sd = random_state_dict(TINY)
    model = load_transformer(save(tmp_path / "plain.safetensors", sd={k: v.to(fp8) for k, v in sd.items()}), **CPU)
    assert model.blocks[0].mlp.inverted_conv.conv.weight.dtype == fp8  # the Mix-FFN's 1x1 convs too
    assert model.blocks[0].attn.qkv.weight.dtype == fp8
    assert model.t_block[1].weight.dtype == torch.float32  # outside the blocks: upcast at load
    assert rel_err(run(model), run(float_model_with({k: v.to(fp8).float() for k, v in sd.items()}))) < 1e-6


# ----------------------------------------------------------------------------- the layers

def test_quantized_layer_applies_comfyui_weight_functions_after_dequantizing():
    """ComfyUI's low-VRAM path patches weights (LoRA) through weight_function, as its LowVramPatch does for its own
    fp8 layers: the stored form (as float32) converted by the layer, patched, handed back through set_weight."""
    w = torch.randn(48, 64)
    q = QuantizedTensor(torch.from_numpy(gguf.quants.quantize(w.numpy(), Q.Q8_0)), "Q8_0", w.shape)
    lin = quantized_ops.Linear(64, 48, device="meta")
    lin.hold(q, "cpu")
    lin.bias = torch.nn.Parameter(torch.randn(48), requires_grad=False)
    x, delta = torch.randn(3, 64), torch.randn(48, 64)
    lin.weight_function = [lambda stored: lin.set_weight(lin.convert_weight(stored) + delta, return_weight=True)]
    expected = x @ (q.dequantize() + delta).T + lin.bias
    assert torch.allclose(lin(x), expected, atol=1e-5)
    conv = quantized_ops.Conv2d(64, 48, 1, bias=False, device="meta")
    conv.hold(QuantizedTensor(q.data, "Q8_0", torch.Size([48, 64, 1, 1])), "cpu")
    image = torch.randn(1, 64, 2, 3)
    assert torch.allclose(conv(image), torch.einsum("oc,bchw->bohw", q.dequantize(), image), atol=1e-5)


def test_quantized_ops_without_quantized_weights_are_torch_layers():
    lin = quantized_ops.Linear(8, 4)
    lin.weight.data.normal_()
    lin.bias.data.normal_()
    x = torch.randn(2, 8)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))


# ----------------------------------------------------------------------------- malformed files

def test_malformed_gguf_files_get_clear_errors(tmp_path, written):
    _, files = written
    data = files["q8_0"].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.gguf is not a readable GGUF file.*download it again"):
        load_transformer(tmp_path / "cut.gguf", **CPU)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match="junk.gguf is not a readable GGUF file"):
        load_transformer(tmp_path / "junk.gguf", **CPU)

    sd = random_state_dict(TINY)
    tensors, shapes = gguf_tensors(sd, lambda n, t: "Q8_0" if is_matrix(n, t) else None)
    name = "blocks.0.attn.proj.weight"
    tensors[name] = (gguf.quants.quantize(sd[name].numpy(), Q.Q4_1), Q.Q4_1)
    with pytest.raises(CheckpointError, match=f"tensor {name} is Q4_1, which cannot be loaded; supported: .*Q6_K"):
        load_transformer(write_gguf(tmp_path / "q41.gguf", tensors, shapes), **CPU)

    tensors, shapes = gguf_tensors(sd, lambda n, t: "Q8_0" if is_matrix(n, t) else None)
    shapes["blocks.0.mlp.point_conv.conv.weight"] = (TINY.width, TINY.mlp_hidden, 2, 1)
    with pytest.raises(CheckpointError, match="point_conv.conv.weight holds 10240 Q8_0 values.*damaged"):
        load_transformer(write_gguf(tmp_path / "shape.gguf", tensors, shapes), **CPU)


def fp8_file(tmp_path, name, edit):
    sd = random_state_dict(TINY)
    out = {}
    for key, t in sd.items():
        if is_matrix(key, t):
            out[key] = t.to(torch.float8_e4m3fn)
            out[key[:-len("weight")] + "scale_weight"] = torch.tensor(1.0)
        else:
            out[key] = t
    out["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    edit(out)
    return save(tmp_path / name, sd=out)


def no_fp8_left(sd):
    for k in [k for k in sd if k.endswith("scale_weight")]:
        del sd[k]
    sd.update({k: v.float() for k, v in sd.items() if v.dtype == torch.float8_e4m3fn and k != "scaled_fp8"})


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.update({"blocks.0.attn.proj.weight": sd["blocks.0.attn.proj.weight"].float()}),
     "blocks.0.attn.proj.scale_weight scales blocks.0.attn.proj.weight, which is float32, not fp8"),
    (no_fp8_left, "marked scaled_fp8 .* but holds no fp8 weights"),
    (lambda sd: sd.pop("blocks.1.attn.proj.weight"), "blocks.1.attn.proj.weight, which is missing"),
    (lambda sd: sd.update({"blocks.0.attn.qkv.scale_weight": torch.ones(5)}), "one or 192; found float32 "
                                                                               "of shape \\[5\\]"),
    (lambda sd: sd.update({"blocks.0.attn.qkv.scale_weight": torch.tensor(float("nan"))}), "positive finite"),
    (lambda sd: sd.update({"blocks.0.attn.qkv.scale_weight": torch.tensor(-1.0)}), "positive finite"),
])
def test_malformed_fp8_files_get_clear_errors(tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        load_transformer(fp8_file(tmp_path, "bad_fp8.safetensors", edit), **CPU)


def test_generate_with_quantized_transformers(tmp_path):
    """The headless command makes the same picture from Q8_0 / fp8 copies of the demo DiTs (Sprint too)."""
    from PIL import Image

    from sana_core.demo import write_demo_models
    models = write_demo_models(tmp_path / "models")

    def generate(transformer, out):
        argv = ["generate", "--prompt", "a red fox", "--transformer", str(transformer), "--vae",
                str(models["autoencoder"]), "--text-encoder", str(models["text_encoder"]), "--out", str(out),
                "--width", "64", "--height", "64", "--steps", "2", "--device", "cpu"]
        assert cli(argv) == 0
        return np.asarray(Image.open(out)).astype(np.float32)

    for kind in ("transformer", "sprint"):
        reference = generate(models[kind], tmp_path / f"{kind}.png")
        for fmt, tolerance in (("q8_0", 1.5), ("fp8", 4.0)):  # mean |difference| in 0..255 levels (0.2-1.4 seen)
            quantized = tmp_path / f"{kind}_{fmt}.{'safetensors' if fmt == 'fp8' else 'gguf'}"
            quantize_checkpoint(models[kind], quantized, fmt)
            image = generate(quantized, tmp_path / f"{kind}_{fmt}.png")
            assert np.abs(image - reference).mean() < tolerance

