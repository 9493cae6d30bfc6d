"""fp8 compute (dtype="fp8_e4m3fn_fast", sana_core.fp8): the row-quantizing kernel against its twin and float64,
fp8 layers and the whole DiT against float within fp8's error, and the fallback where fp8 matmuls cannot run.

On the CPU the fp8 path is forced (fp8_unavailable patched to say "available"): torch._scaled_mm runs on the CPU
too, so the layers compute what they compute on an H200, with the kernel under TRITON_INTERPRET=1 or its twin.
Tolerances: e4m3 keeps 3 mantissa bits, so one value is off by at most 2^-4 of itself (1/16); a matmul of two
quantized operands lands near 3-4% relative error, a whole tiny DiT near 5%.
"""
import logging
import os

import pytest
import torch
import torch.nn as nn
from conftest import rel_err
from safetensors.torch import save_file

from sana_core import fp8, kernels as K
from sana_core.__main__ import main as cli
from sana_core.demo import write_demo_lora
from sana_core.lora import apply_lora, read_lora, unload_loras
from sana_core.transformer import SanaConfig, config_metadata, load_transformer, random_state_dict

TINY = SanaConfig(depth=2, width=64, caption_dim=48, self_heads=2, cross_heads=2, mlp_hidden=160)  # all sizes % 16
RUNS_TRITON = K.HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
LAYER_TOL = 0.06  # one fp8 matmul against float64 (measured ~0.03)
MODEL_TOL = 0.1  # the tiny DiT, every block matmul in fp8, against float32 (measured ~0.04)


@pytest.fixture
def fp8_here(monkeypatch):
    """fp8 matmuls 'available' on whatever device the test runs (the CPU has torch._scaled_mm)."""
    monkeypatch.setattr(fp8, "fp8_unavailable", lambda device: None)


def rows_ref(x, y=None, gate=None, shift=None, scale=None, eps=1e-6):  # float64, from the formulas
    v = x.double()
    if y is not None:
        v = v + gate.double().reshape(-1, 1, v.shape[-1]) * y.double()
    if shift is not None:
        v = (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + eps)
        v = v * (1 + scale.double().reshape(-1, 1, v.shape[-1])) + shift.double().reshape(-1, 1, v.shape[-1])
    return v


def dequantized(q, s):
    return q.double() * s.double()[..., None]


def test_twin_rounds_each_value_within_e4m3_error():
    v = torch.randn(3, 7, 96, dtype=torch.float64) * torch.logspace(-3, 3, 96, dtype=torch.float64)
    q, s = K.quantize_rows_torch(v)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 7)
    assert torch.equal(q.float().abs().amax(-1), torch.full((3, 7), 448.0))  # each row's largest value -> 448
    err = (dequantized(q, s) - v).abs()
    assert (err <= torch.maximum(v.abs() / 16, s.double()[..., None] * 2.0 ** -10)).all()  # normal / subnormal
    zero_q, zero_s = K.quantize_rows_torch(torch.zeros(1, 1, 16))
    assert not zero_q.float().any() and (zero_s > 0).all()


@pytest.mark.skipif(not RUNS_TRITON, reason="Triton missing, or no GPU and no TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # bf16: the interpreter computes it wrongly
def test_rows_fp8_kernel_matches_twin_and_float64(dtype, monkeypatch):
    K.set_backend("triton")
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: (lambda t: t.fill_(float("nan")) if t.is_floating_point()
                                                         else t)(empty(*a, **k)))  # unwritten outputs fail
    try:
        g = torch.Generator().manual_seed(0)
        B, N, C = 2, 5, 40  # C not a power of two
        x, y = (torch.randn(B, N, C, generator=g) * 3 + 1).to(dtype), torch.randn(B, N, C, generator=g).to(dtype)
        mod = torch.randn(B, 6, C, generator=g).to(dtype)
        uses = {"quantize": (x,), "residual": (x, y, mod[:, 2]), "adaln": (x, None, None, mod[:, 0:1], mod[:, 1:2]),
                "residual+adaln": (x, y, mod[:, 2], mod[:, 0:1], mod[:, 1:2]),
                "shared modulation": (x, y, mod[0, 2], mod[0, 0], mod[0, 1])}
        for name, args in uses.items():
            r, q, s = K.rows_fp8_triton(*args)
            r_twin, q_twin, s_twin = K.rows_fp8_torch(*args)
            assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == (B, N), name
            if r_twin is None:
                assert r is None, name
            else:
                assert r.dtype == dtype and torch.equal(r, r_twin), name
            assert torch.allclose(s, s_twin, rtol=1e-5), name
            # Triton's interpreter rounds a few values just under a power of two down a binade (127.1 -> 64);
            # on a GPU every value equals the twin's
            same = (q.float() == q_twin.float()).float().mean()
            assert same == 1 if x.is_cuda else same > 0.95, name
            ref = rows_ref(*args)
            assert rel_err(dequantized(q_twin, s_twin), ref) < 0.03, name
            assert rel_err(dequantized(q, s), ref) < (0.03 if x.is_cuda else 0.08), name
    finally:
        K.set_backend("auto")


def test_fp8_layer_matches_float_within_tolerance(fp8_here):
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(96, 48).to(torch.bfloat16)
    conv = nn.Conv2d(96, 48, 1, bias=False).to(torch.bfloat16)
    x = torch.randn(2, 7, 96, generator=g).to(torch.bfloat16)
    for layer in (linear, conv):
        f = fp8.Fp8Linear.from_layer(layer)
        assert f.weight.dtype == torch.float8_e4m3fn and f.scale_weight.shape == (48,)
        assert fp8.takes_fp8_rows(f, x) and not fp8.takes_fp8_rows(layer, x)
        w = layer.weight.double().flatten(1)
        ref = x.double() @ w.t() + (0 if layer.bias is None else layer.bias.double())
        out = f(x)
        assert out.dtype == torch.bfloat16 and out.shape == (2, 7, 48) and rel_err(out, ref) < LAYER_TOL
        assert torch.equal(f(fp8.Fp8Rows(*K.rows_fp8(x)[1:])), out)  # rows from a producer: the same matmul
        assert rel_err(f.dequantized_weight(torch.float64, "cpu"), layer.weight.double()) < 0.03
        assert f.dequantized_weight(torch.float32, "cpu").shape == layer.weight.shape
        grid = x.transpose(1, 2).reshape(2, 96, 7, 1)  # called as a 1x1 conv on a (B, C, h, w) grid
        assert torch.equal(f(grid).flatten(2).transpose(1, 2), out)


def run(model, batch=2, h=3, w=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 32, h, w, generator=g).to(dtype)
    context = torch.randn(batch, 6, model.config.caption_dim, generator=g).to(dtype)
    with torch.no_grad():
        return model(x, torch.full((batch,), 500.0), context, torch.ones(batch, 6)).double()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8") / "sana_tiny.safetensors"
    save_file(random_state_dict(TINY), path, metadata=config_metadata(TINY))
    return path


def test_fp8_dit_matches_float_within_tolerance(tiny_file, fp8_here, monkeypatch):
    """Every block's six matmuls run in fp8 (counted), fed by the adaLN kernel's fp8 rows; the velocity is the
    float32 model's within MODEL_TOL."""
    ref = run(load_transformer(tiny_file, dtype=torch.float32, device="cpu"))
    model = fp8.use_fp8_compute(load_transformer(tiny_file, dtype=torch.bfloat16, device="cpu"))
    calls, scaled_mm = [], torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(a[0].dtype) or scaled_mm(*a, **k))
    out = run(model, dtype=torch.bfloat16)
    assert calls == [torch.float8_e4m3fn] * len(fp8.BLOCK_LAYERS) * TINY.depth
    assert rel_err(out, ref) < MODEL_TOL
    assert type(model.blocks[0].cross_attn.kv_linear) is nn.Linear  # the caption side keeps its dtype


def test_fallback_computes_from_fp8_weights_with_a_message(tiny_file, caplog, monkeypatch):
    """On the CPU (and GPUs under compute capability 8.9) fp8_e4m3fn_fast keeps the weights in fp8 and computes
    in the model's dtype from them, saying so; the result is the float model's within the weights' fp8 error."""
    with caplog.at_level(logging.WARNING, logger="sana_core.fp8"):
        model = load_transformer(tiny_file, dtype=fp8.FP8_COMPUTE, device="cpu")
    assert "fp8_e4m3fn_fast: the DiT runs on the CPU, which has no fp8 matmuls" in caplog.text
    assert "computes in torch.float32 from its fp8 weights" in caplog.text
    assert model.blocks[1].mlp.point_conv.conv.weight.dtype == torch.float8_e4m3fn
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1))
    ref = run(load_transformer(tiny_file, dtype=torch.float32, device="cpu"))
    assert rel_err(run(model), ref) < 0.05 and not calls
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(fp8, "_capability", lambda index: (7, 5))
    fp8.fp8_unavailable.cache_clear()  # the answer is cached per device
    try:
        assert fp8.fp8_unavailable("cuda:0") == ("Tesla T4 (compute capability 7.5) has no fp8 tensor cores (they "
                                                 "need 8.9: Ada, Hopper or newer)")
        monkeypatch.setattr(fp8, "_capability", lambda index: (9, 0))
        fp8.fp8_unavailable.cache_clear()
        assert fp8.fp8_unavailable("cuda:0") is None
    finally:
        fp8.fp8_unavailable.cache_clear()


def test_model_loader_node_offers_fp8_compute(tiny_file, caplog):
    """SANA Model Loader: dtype fp8_e4m3fn_fast (ComfyUI's name) gives fp8 layers, here on the CPU the fallback
    with its message; its tooltip says what fp8 compute trades."""
    from sana_nodes import host
    from sana_nodes.loaders import SanaModelLoader
    dtype_input = SanaModelLoader.INPUT_TYPES()["required"]["dtype"]
    assert fp8.FP8_COMPUTE in dtype_input[0] and "less accurate" in dtype_input[1]["tooltip"]
    folder = tiny_file.parent / "models"
    (folder / "diffusion_models").mkdir(parents=True, exist_ok=True)
    (folder / "diffusion_models" / tiny_file.name).write_bytes(tiny_file.read_bytes())
    previous = host._host
    host.use(host.LocalHost(folder, device="cpu"))
    try:
        with caplog.at_level(logging.WARNING, logger="sana_core.fp8"):
            managed, = SanaModelLoader().load(tiny_file.name, fp8.FP8_COMPUTE)
    finally:
        host._host = previous
    assert isinstance(managed.model.blocks[0].attn.qkv, fp8.Fp8Linear) and "no fp8 matmuls" in caplog.text


def test_fp8_file_keeps_its_bytes(tiny_file, tmp_path):
    """A scaled-fp8 file (e4m3fn, one scale per tensor) loaded for fp8 compute keeps its stored bytes, the
    scale repeated per output channel: no second rounding."""
    fp8_file = tmp_path / "sana_tiny_fp8.safetensors"
    assert cli(["quantize", str(tiny_file), str(fp8_file), "--format", "fp8"]) == 0
    stored = load_transformer(fp8_file, dtype=torch.float32, device="cpu").blocks[0].attn.qkv
    fast = load_transformer(fp8_file, dtype=fp8.FP8_COMPUTE, device="cpu").blocks[0].attn.qkv
    assert torch.equal(fast.weight.view(torch.uint8), stored.weight.view(torch.uint8))
    assert torch.equal(fast.scale_weight, stored.scale_weight.expand(stored.weight.shape[0]))


def test_lora_merges_into_fp8_weights_and_comes_out_exactly(tiny_file, tmp_path):
    """sana_core.lora merges into weight x scale (Fp8Linear.convert_weight / set_weight), not into the raw fp8
    values: the result is the float model's with the LoRA within fp8's error; unloading gives the bytes back."""
    lora_file = write_demo_lora(tmp_path / "lora.safetensors", depth=TINY.depth, width=TINY.width)
    ref = load_transformer(tiny_file, dtype=torch.float32, device="cpu")
    apply_lora(ref, read_lora(lora_file, ref))
    model = load_transformer(tiny_file, dtype=fp8.FP8_COMPUTE, device="cpu")
    before = model.blocks[0].attn.qkv.weight.clone()
    apply_lora(model, read_lora(lora_file, model))
    assert not torch.equal(model.blocks[0].attn.qkv.weight.view(torch.uint8), before.view(torch.uint8))
    assert rel_err(run(model), run(ref)) < 0.06  # the LoRA alone moves the output by ~40%
    unload_loras(model)
    assert torch.equal(model.blocks[0].attn.qkv.weight.view(torch.uint8), before.view(torch.uint8))
