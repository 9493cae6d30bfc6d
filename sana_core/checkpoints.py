"""Reading checkpoint files: every published layout, offline, without a float32 copy in RAM.

The loaders of the three components (transformer, autoencoder, text encoder) share this:
`read_checkpoint` opens a file or a folder and returns its tensors lazily (safetensors and
`.pth` are memory-mapped), `load_weights` streams them into a model built on the meta
device, straight to the target device and dtype, and `guess_component` names what a
set of keys looks like so that a file given to the wrong loader gets a clear error.
"""
import json
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """A file that is not what the loader expected; the message says what it looks like."""


PTH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64) + FP8_DTYPES


def read_checkpoint(path, *, weight_names=None) -> tuple[dict, dict]:
    """(tensors, metadata) of a file or a folder. Tensors stay memory-mapped until used.

    A folder is read through its safetensors index (`*.safetensors.index.json`) when it has
    one, else every `*.safetensors` in it (`weight_names` restricts the file names tried
    first, e.g. ("diffusion_pytorch_model", "model")). `metadata` holds the safetensors
    header metadata and, for a folder, its parsed `config.json` under "config".
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        return _read_folder(path, weight_names)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in PTH_SUFFIXES:
        return _read_pth(path), {}
    raise CheckpointError(f"{path.name}: unknown file type {path.suffix!r}; expected .safetensors, "
                          f"{', '.join(PTH_SUFFIXES)} or a folder")


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # mmap-backed, no copy
    except Exception as e:  # safetensors raises several types for damaged files
        raise CheckpointError(f"{path.name} is not a readable safetensors file ({e}); "
                              f"it may be truncated by an interrupted download: download it again") from None
    return tensors, metadata


def _read_pth(path: Path) -> dict:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{path.name} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e)[:200]}); it may be truncated, or hold objects other than "
                              f"tensors (only weights are loaded, never code)") from None
    for key in ("state_dict", "model", "module", "ema"):  # weights nested by the training code
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path.name} holds no dictionary of tensors")
    return obj


def _read_folder(path: Path, weight_names) -> tuple[dict, dict]:
    config_file = path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else None
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if weight_names:
        indexes = [p for p in indexes if p.name.split(".")[0] in weight_names] or indexes
    if indexes:
        index = json.loads(indexes[0].read_text())
        files = sorted(set(index["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if weight_names:
            files = [f for f in files if f.split(".")[0] in weight_names] or files
    if not files:
        raise CheckpointError(f"{path} holds no .safetensors weights (found: "
                              f"{', '.join(sorted(p.name for p in path.iterdir())[:10]) or 'nothing'})")
    tensors, metadata = {}, {}
    for name in files:
        if not (path / name).exists():
            raise CheckpointError(f"{path}: shard {name} named by the index is missing")
        t, m = _read_safetensors(path / name)
        tensors.update(t)
        metadata.update(m)
    if config is not None:
        metadata["config"] = config
    return tensors, metadata


def strip_prefix(tensors: dict, prefixes=("model.diffusion_model.", "model.")) -> dict:
    """Remove the first of `prefixes` that every key carries (ComfyUI single files)."""
    for prefix in prefixes:
        if tensors and all(k.startswith(prefix) for k in tensors):
            return {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def guess_component(keys) -> str:
    """'transformer', 'autoencoder', 'text_encoder', 'controlnet' (a diffusers- or UNet-style ControlNet of any
    family; an original SANA file holding a ControlNet is a 'transformer') or 'unknown', from key names alone."""
    keys = list(keys)
    text = " ".join(keys[:5000])
    if "embed_tokens" in text or "self_attn.q_proj" in text:
        return "text_encoder"
    if "controlnet_blocks." in text or "input_hint_block." in text or "controlnet_cond_embedding." in text:
        return "controlnet"
    if "scale_shift_table" in text or "x_embedder" in text or "patch_embed" in text:
        return "transformer"
    if "decoder." in text or "encoder." in text:
        return "autoencoder"
    return "unknown"


def describe(tensors: dict) -> str:
    """One line saying what a state dict looks like, for error messages."""
    keys = sorted(tensors)
    kind = guess_component(keys)
    looks = {"transformer": "a SANA transformer (DiT)", "autoencoder": "an autoencoder (VAE)",
             "text_encoder": "a text encoder (Gemma/LLM)", "controlnet": "a ControlNet",
             "unknown": "no known SANA component"}[kind]
    return f"{len(keys)} tensors that look like {looks}, e.g. {', '.join(keys[:3])}"


def check_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"tensor {name} has dtype {tensor.dtype}, which cannot be loaded; supported: "
                              f"float32, float16, bfloat16 and fp8 (e4m3fn, e5m2), which is upcast")


def load_weights(model: torch.nn.Module, tensors: dict, *, device, dtype, keep_fp32=(), on_cpu=()) -> torch.nn.Module:
    """Fill a model built on the meta device with `tensors`, each moved straight to
    `device` and `dtype` (fp8 is upcast), one at a time. Names must match exactly:
    missing or unexpected keys are an error naming them. Parameters whose name contains
    one of `keep_fp32` stay float32; those whose name starts with one of `on_cpu` go to the CPU.
    Tensors already off the meta device (quantized layers' stored weights) are left as they are."""
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if v.is_meta}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            "the weights do not match the model: "
            + (f"missing {len(missing)} ({', '.join(missing[:8])}) " if missing else "")
            + (f"unexpected {len(unexpected)} ({', '.join(unexpected[:8])})" if unexpected else ""))
    for name, param in expected.items():
        t = tensors[name]
        check_dtype(name, t)
        if t.shape != param.shape:
            raise CheckpointError(f"tensor {name} has shape {list(t.shape)}, the model expects {list(param.shape)}")
        target = torch.float32 if any(s in name for s in keep_fp32) else dtype
        value = t.to(device="cpu" if name.startswith(on_cpu) else device, dtype=target)
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(param, torch.nn.Parameter):
            module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[attr] = value
    return model.eval().requires_grad_(False)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device) -> torch.dtype:
    """bf16 on a GPU that supports it, fp16 on an older GPU, fp32 on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
