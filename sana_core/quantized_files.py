"""Quantized checkpoint files: reading them with their tensors kept quantized, and writing them.

Read (read_quantized_checkpoint, what load_transformer calls):
- GGUF (`.gguf`, read with the `gguf` package): F32 / F16 / BF16 tensors as tensors, Q8_0, Q5_0, Q4_0, Q4_K,
  Q5_K, Q6_K as QuantizedTensor. Shapes are GGUF's reversed, or the `comfy.gguf.orig_shape.<name>` entry
  (ComfyUI-GGUF's convention, which our writer uses for the 1x1 convs stored as matrices). String entries
  are kept as metadata; `sana.config` is the SanaConfig JSON our writer stores.
- ComfyUI's scaled fp8 (safetensors/.pth with a `scaled_fp8` marker whose dtype names the fp8 type; per
  layer `<layer>.scale_weight`, optional `<layer>.scale_input`; the `weight_scale` / `input_scale`
  spellings are read too) and plain fp8 files: every fp8 tensor becomes a QuantizedTensor (weight x scale).
Key names stay as stored (original, ComfyUI-prefixed or diffusers): the loader renames them.

Write (write_gguf, write_scaled_fp8; `python -m sana_core quantize IN OUT --format ...`): the Linear and
1x1-conv weights of the DiT blocks in fp8 (ComfyUI's scaled layout, one scale per tensor) or GGUF Q8_0 /
Q5_0 / Q4_0 (gguf's own quantizer); all other tensors as they were (float32 / float16 / bfloat16).
Both files name the tool and format in their metadata.
"""
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoints import CheckpointError, read_checkpoint
from .kernels.dequant import FORMATS as GGUF_FORMATS
from .quantized import FP8, QUANTIZATION_KEY, QuantizedTensor

TOOL = "comfyui-sana sana_core.quantize"
WRITE_FORMATS = ("fp8", "q8_0", "q5_0", "q4_0")
GGUF_ARCH = "sana"
CONFIG_FIELD = "sana.config"
ORIG_SHAPE = "comfy.gguf.orig_shape."
SCALE_NAMES = {"scale_weight": "scale", "weight_scale": "scale",  # ComfyUI's spelling, then others'
               "scale_input": "input_scale", "input_scale": "input_scale"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("GGUF files need the `gguf` package: pip install gguf") from None
    return gguf


def read_quantized_checkpoint(path, **kw) -> tuple[dict, dict]:
    """read_checkpoint, plus `.gguf` files, with quantized tensors as QuantizedTensor. When it found any,
    metadata[QUANTIZATION_KEY] names the format (e.g. "GGUF Q8_0", "scaled fp8_e4m3fn")."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return read_gguf(path)
    tensors, metadata = read_checkpoint(path, **kw)
    tensors, kind = _group_fp8(tensors, path.name)
    if kind:
        metadata[QUANTIZATION_KEY] = kind
    return tensors, metadata


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _group_fp8(tensors: dict, name: str) -> tuple[dict, str | None]:
    """fp8 tensors -> QuantizedTensor with their scales; the `scaled_fp8` marker removed."""
    markers = [k for k in tensors if k == "scaled_fp8" or k.endswith(".scaled_fp8")]
    scales = {k for k in tensors if k.rpartition(".")[2] in SCALE_NAMES}
    fp8 = [k for k, t in tensors.items() if t.dtype in FP8.values() and k not in scales and k not in markers]
    if not (markers or scales or fp8):
        return tensors, None
    marker = _name(tensors[markers[0]].dtype) if markers else None
    if markers and not fp8:
        raise CheckpointError(f"{name} is marked scaled_fp8 ({marker}) but holds no fp8 weights: the file is "
                              f"damaged or was written wrongly; convert the original checkpoint again")
    out = {k: v for k, v in tensors.items() if k not in scales and k not in markers}
    by_weight = {}
    for key in sorted(scales):
        layer, _, kind = key.rpartition(".")
        weight, value = layer + ".weight", tensors[key]
        if weight not in tensors or tensors[weight].dtype not in FP8.values():
            found = "is missing" if weight not in tensors else f"is {_name(tensors[weight].dtype)}, not fp8"
            raise CheckpointError(f"{name}: {key} scales {weight}, which {found}: the file is damaged or not a "
                                  f"scaled fp8 checkpoint")
        rows = tensors[weight].shape[0]
        if value.numel() not in (1, rows) or not value.is_floating_point() or not torch.isfinite(value).all() \
                or not (value.float() > 0).all():
            raise CheckpointError(f"{name}: {key} must be positive finite float scale(s), one or {rows}; found "
                                  f"{_name(value.dtype)} of shape {list(value.shape)}: the file is damaged")
        by_weight.setdefault(weight, {})[SCALE_NAMES[kind]] = value.float().reshape(-1 if value.numel() > 1 else ())
    qtypes = {d: n for n, d in FP8.items()}
    for key in fp8:
        t = tensors[key]
        out[key] = QuantizedTensor(t, qtypes[t.dtype], t.shape, **by_weight.get(key, {}))
    found = sorted({qtypes[tensors[k].dtype] for k in fp8})
    return out, ("scaled " if scales or markers else "") + "/".join(found)


def _field(reader, name):
    field = reader.get_field(name)
    return None if field is None else field.contents()


def read_gguf(path: Path) -> tuple[dict, dict]:
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path), mode="c")  # copy-on-write map: in-place patches stay in memory
    except Exception as e:  # gguf raises ValueError, struct errors, IndexError... on damaged files
        raise CheckpointError(f"{path.name} is not a readable GGUF file ({type(e).__name__}: {str(e)[:200]}); "
                              f"it may be truncated by an interrupted download: download it again") from None
    metadata = {k: v for k in reader.fields if isinstance(v := _field(reader, k), str)}
    if CONFIG_FIELD in metadata:
        metadata["config"] = metadata.pop(CONFIG_FIELD)
    plain = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    tensors, kinds = {}, set()
    for t in reader.tensors:
        fmt = t.tensor_type.name
        stored = _field(reader, ORIG_SHAPE + t.name)
        shape = torch.Size(stored if stored is not None else [int(n) for n in reversed(t.shape)])
        data = torch.from_numpy(t.data)
        if fmt in plain:
            data = data.view(torch.uint8).view(plain[fmt])  # BF16 arrives as bytes
        elif fmt not in GGUF_FORMATS:
            raise CheckpointError(f"{path.name}: tensor {t.name} is {fmt}, which cannot be loaded; supported: "
                                  f"F32, F16, BF16, {', '.join(GGUF_FORMATS)}: re-quantize to one of these")
        values = data.numel() if fmt in plain else data.numel() // GGUF_FORMATS[fmt][1] * GGUF_FORMATS[fmt][0]
        if values != shape.numel():
            raise CheckpointError(f"{path.name}: tensor {t.name} holds {values} {fmt} values, its shape "
                                  f"{list(shape)} needs {shape.numel()}: the file is damaged")
        if fmt in plain:
            tensors[t.name] = data.reshape(shape)
        else:  # (rows, bytes per row); a row's blocks run along the last dimension
            tensors[t.name] = QuantizedTensor(data.reshape(shape[0] if len(shape) > 1 else 1, -1), fmt, shape)
            kinds.add(fmt)
    if not tensors:
        raise CheckpointError(f"{path.name} holds no tensors")
    if kinds:
        metadata[QUANTIZATION_KEY] = "GGUF " + "/".join(sorted(kinds))
    return tensors, metadata


# ----------------------------------------------------------------------------- writing

def _quantized_here(name: str, t: torch.Tensor) -> bool:
    """What the writers quantize: the blocks' Linear weights and 1x1 conv weights (not the depthwise conv)."""
    matrix = t.ndim == 2 or (t.ndim == 4 and t.shape[2:] == (1, 1))
    return name.startswith("blocks.") and name.endswith(".weight") and matrix


def _metadata(fmt: str, config_json: str | None) -> dict:
    meta = {"quantized_by": TOOL, "quantization": fmt}
    if config_json:
        meta["config"] = config_json
    return meta


def write_scaled_fp8(state_dict: dict, path, *, config_json=None, progress=None) -> None:
    """ComfyUI's scaled fp8 layout: the blocks' matrices as float8_e4m3fn with a float32 `scale_weight`
    each (amax / 448: weight = fp8 x scale), a `scaled_fp8` marker of two e4m3fn values (ComfyUI: weights
    only, no fp8 matmul with unit input scales), everything else as it was."""
    fp8 = FP8["fp8_e4m3fn"]
    out = {}
    for i, (name, t) in enumerate(state_dict.items()):
        if progress is not None:
            progress(i, len(state_dict))
        if not _quantized_here(name, t):
            out[name] = t.contiguous()
            continue
        w = t.float()
        scale = (w.abs().amax() / torch.finfo(fp8).max).clamp(min=torch.finfo(torch.float32).tiny)
        out[name] = (w / scale).clamp(-torch.finfo(fp8).max, torch.finfo(fp8).max).to(fp8)
        out[name[:-len("weight")] + "scale_weight"] = scale.reshape(())
    out["scaled_fp8"] = torch.zeros(2, dtype=fp8)
    save_file(out, str(path), metadata=_metadata("fp8_e4m3fn", config_json))


def write_gguf(state_dict: dict, path, fmt: str, *, config_json=None, name=None, progress=None) -> None:
    """GGUF with the blocks' matrices in `fmt` (Q8_0, Q5_0 or Q4_0; rows not a whole number of blocks stay
    float), 1x1 conv weights stored as (out, in) matrices with their shape in `comfy.gguf.orig_shape.<name>`,
    everything else in its own float type."""
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType[fmt]
    block = GGUF_FORMATS[fmt][0]
    plain = {torch.float32: gguf.GGMLQuantizationType.F32, torch.float16: gguf.GGMLQuantizationType.F16,
             torch.bfloat16: gguf.GGMLQuantizationType.BF16}
    writer = gguf.GGUFWriter(str(path), arch=GGUF_ARCH)
    writer.add_name(name or Path(path).stem)
    writer.add_quantized_by(TOOL)
    writer.add_file_type(getattr(gguf.LlamaFileType, "MOSTLY_" + fmt))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if config_json:
        writer.add_string(CONFIG_FIELD, config_json)
    for i, (key, t) in enumerate(state_dict.items()):
        if progress is not None:
            progress(i, len(state_dict))
        if _quantized_here(key, t) and t.shape[1] % block == 0:
            if t.ndim == 4:
                writer.add_array(ORIG_SHAPE + key, list(t.shape))
            data = gguf.quants.quantize(t.float().reshape(t.shape[0], -1).numpy(), qtype)
            writer.add_tensor(key, data, raw_dtype=qtype)
        elif t.dtype in plain:  # bfloat16 goes as its bytes (numpy has no bfloat16)
            raw = t.contiguous().view(torch.uint8) if t.dtype == torch.bfloat16 else t.contiguous()
            writer.add_tensor(key, raw.numpy(), raw_dtype=plain[t.dtype])
        else:
            raise CheckpointError(f"tensor {key} is {t.dtype}; the writer takes float32, float16 and bfloat16")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize_checkpoint(source, out, fmt: str, *, progress=None, **hints) -> dict:
    """Read a SANA DiT checkpoint (any layout load_transformer reads: original, ComfyUI-prefixed, diffusers)
    and write it quantized: `fmt` one of WRITE_FORMATS. The output has original key names and the model's
    config in its metadata. progress(done, total): called per tensor while quantizing. Returns a summary
    (formats, sizes) for the command line."""
    from .transformer import config_metadata, load_transformer

    source, out = Path(source), Path(out)
    if fmt not in WRITE_FORMATS:
        raise ValueError(f"format must be one of {', '.join(WRITE_FORMATS)}, got {fmt!r}")
    want = ".safetensors" if fmt == "fp8" else ".gguf"
    if out.suffix.lower() != want:
        raise ValueError(f"{fmt} files are {want}: name the output e.g. {out.with_suffix(want).name}")
    peek = source / "transformer" if (source / "transformer").is_dir() else source  # a pipeline folder
    tensors, metadata = read_quantized_checkpoint(peek)
    if QUANTIZATION_KEY in metadata:
        raise CheckpointError(f"{source.name} is already quantized ({metadata[QUANTIZATION_KEY]}): quantize "
                              f"the bfloat16 / float16 / float32 checkpoint it was made from")
    dtype = max((t for t in tensors.values() if t.is_floating_point()), key=lambda t: t.numel()).dtype
    del tensors
    model = load_transformer(source, dtype=dtype, device="cpu", **hints)  # original names, ignored keys dropped
    config_json = config_metadata(model.config)["config"]
    state_dict = model.state_dict()
    if fmt == "fp8":
        write_scaled_fp8(state_dict, out, config_json=config_json, progress=progress)
    else:
        write_gguf(state_dict, out, fmt.upper(), config_json=config_json, name=source.stem, progress=progress)
    return dict(source=str(source), out=str(out), format=fmt, variant=model.config.variant,
                source_mib=round(sum(t.numel() * t.element_size() for t in state_dict.values()) / 2**20),
                out_mib=round(out.stat().st_size / 2**20))
