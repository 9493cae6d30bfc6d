"""Reading checkpoint files: every published layout, offline, without a float32 copy in RAM.

The loaders of the three components (transformer, autoencoder, text encoder) share this:
`read_checkpoint` opens a file or a folder and returns its tensors lazily (safetensors and
`.pth` are memory-mapped), `load_weights` streams them into a model built on the meta
device, straight to the target device and dtype, and `guess_component` names what a
set of keys looks like so that a file given to the wrong loader gets a clear error.
"""
import json
import logging
import re
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open

log = logging.getLogger(__name__)

class CheckpointError(ValueError):
    """A file that is not what the loader expected; the message says what it looks like. For the other
    surfaces (ComfyUI nodes) to word it their way: `found`, the component the file holds when it is another
    one ("transformer", "autoencoder", "text_encoder"); `needs`, the loader hint the file lacks."""

    def __init__(self, message: str, *, found: str = None, needs: str = None):
        super().__init__(message)
        self.found, self.needs = found, needs


PTH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64) + FP8_DTYPES


def read_checkpoint(path, *, weight_names=None, dtype=None) -> tuple[dict, dict]:
    """(tensors, metadata) of a file or a folder. Tensors stay memory-mapped until used.

    A folder holds one or more complete sets of safetensors weights (`select_weight_files`: one
    set is read, never a merge of two; `weight_names` are the file names tried first, e.g.
    ("diffusion_pytorch_model", "model"); `dtype` picks the matching variant). `metadata` holds
    the safetensors header metadata and, for a folder, its parsed `config.json` under "config".
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        return _read_folder(path, weight_names, dtype)
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
    """Tensors only (torch's weights-only unpickler), memory-mapped when saved in the zip format; the
    legacy (non-zip) format cannot be mapped and is read into RAM."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        found = re.search(r"Unsupported (?:global|operand)[^.]*?(?:GLOBAL )?([\w.]+) was not", str(e))
        if found or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path.name} holds Python objects or code besides tensors"
                + (f" (it refers to {found[1]})" if found else "")
                + "; only tensors are loaded from .pth files, and no code in them is run. Use a .safetensors "
                  "file of the same model, or a .pth that holds only its weights (a dictionary of tensors)") from None
        raise CheckpointError(f"{path.name} is damaged or incomplete, it cannot be read as a PyTorch checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'no data'}); "
                              f"it was probably truncated by an interrupted download or copy: download it again") from None
    for key in ("state_dict", "model", "module", "ema"):  # weights nested by the training code
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path.name} holds no dictionary of tensors")
    return obj


VARIANT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # float variants, preferred first
VARIANTS = tuple(VARIANT_DTYPES) + ("fp8", "int8", "int4", "nf4")
_INDEX = re.compile(r"(?P<base>.+)\.safetensors\.index(?:\.(?P<variant>\w+))?\.json")
_WEIGHTS = re.compile(rf"(?P<base>.+?)(?:\.(?P<variant>{'|'.join(VARIANTS)}))?(?P<shard>-\d+-of-(?P<n>\d+))?\.safetensors")


def select_weight_files(path: Path, weight_names=None, dtype=None) -> list:
    """The file names of ONE complete set of weights in a diffusers / transformers folder, which may hold
    the plain set (`model.safetensors`, or shards named by `model.safetensors.index.json`) beside variants
    (`model.bf16.safetensors`, `model.safetensors.index.fp16.json` + shards, `model.int4.safetensors`).
    In order: the variant of `dtype`; the plain set; any complete float variant (fp32, bf16, fp16; the
    loader converts it). An index whose shards are not all there is skipped (with a note in the log);
    a folder of non-float variants only (int4, ...) is an error that names them."""
    sets, incomplete = {}, []  # (base, variant) -> file names
    names = sorted(p.name for p in path.iterdir())
    indexed = set()
    for name in names:
        m = _INDEX.fullmatch(name)
        if m:
            files = sorted(set(json.loads((path / name).read_text())["weight_map"].values()))
            indexed.update(files)
            missing = [f for f in files if not (path / f).exists()]
            if missing:
                incomplete.append(f"{name} (missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})")
                log.warning("%s: %s names shards that are not there (%s); skipped", path, name, ", ".join(missing[:3]))
            else:
                sets[(m["base"], m["variant"])] = files
    shards = {}
    for name in names:
        m = _WEIGHTS.fullmatch(name)
        if m is None or name in indexed:
            continue
        if m["shard"] is None:
            sets.setdefault((m["base"], m["variant"]), [name])
        else:  # shards without an index: complete when all n are there
            shards.setdefault((m["base"], m["variant"], int(m["n"])), []).append(name)
    for (base, variant, n), files in shards.items():
        if len(files) == n:
            sets.setdefault((base, variant), sorted(files))
    if not sets:
        found = ", ".join(names[:10]) or "nothing"
        raise CheckpointError(f"{path} holds no {'complete set of ' if incomplete else ''}.safetensors weights "
                              f"(found: {found}"
                              + (f"; incomplete: {'; '.join(incomplete)}" if incomplete else "") + ")")
    bases = sorted({b for b, _ in sets})
    preferred = [b for b in (weight_names or ()) if b in bases]
    if not preferred and len(bases) > 1:
        raise CheckpointError(f"{path} holds the weights of several models ({', '.join(bases)}): "
                              f"give the file of the one you want instead of the folder")
    base = (preferred or bases)[0]
    wanted = {v: k for k, v in VARIANT_DTYPES.items()}.get(dtype)
    for variant in (wanted, None, *VARIANT_DTYPES):
        if (base, variant) in sets:
            return sets[(base, variant)]
    other = sorted(f for (b, _), files in sets.items() if b == base for f in files)
    raise CheckpointError(f"{path} holds only {', '.join(other)}: quantized variants cannot be loaded here. "
                          f"Download the plain (fp32), bf16 or fp16 weights of this model into the folder")


def _read_folder(path: Path, weight_names, dtype=None) -> tuple[dict, dict]:
    config_file = path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else None
    tensors, metadata = {}, {}
    for name in select_weight_files(path, weight_names, dtype):
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
