"""LoRA for the SANA DiT: the files people train and share, mapped onto our parameters (the original NVlabs
names), merged into the weights in place and taken out exactly.

    lora = read_lora("pixel_art.safetensors", model)   # format told by the keys; unmatched keys in lora.unmatched
    apply_lora(model, lora, strength=0.8)              # stacks; a negative strength subtracts
    unload_loras(model)                                # the original weights back, bit for bit

Formats (told by the key names, never by the file name):
- diffusers / PEFT, as train_dreambooth_lora_sana.py saves it: `transformer.transformer_blocks.0.attn1.to_q.
  lora_A.weight` / `lora_B.weight` (+ `lora_B.bias` with PEFT's lora_bias), alpha and rank patterns from the
  `lora_adapter_metadata` JSON of the safetensors header (else alpha = rank, as diffusers does);
- kohya / OneTrainer: `lora_transformer_transformer_blocks_0_attn1_to_q.lora_down.weight` / `lora_up` / `.alpha`;
- the original NVlabs names, dotted or kohya-underscored, bare or under ComfyUI's `diffusion_model.` /
  `lora_unet_`: `blocks.0.attn.qkv.lora_A.weight`, `lora_unet_blocks_0_cross_attn_kv_linear.lora_down.weight`.
diffusers' separate q/k/v (k/v in cross-attention) land on row slices of our fused `attn.qkv`
(`cross_attn.kv_linear`). LyCORIS LoHa / LoKr and DoRA files are recognised and named: ComfyUI's own weight
adapters apply them once their names are mapped; the library merges plain LoRA only.

`match_keys` is the one name mapping: file module name -> Target(our parameter, (dim, offset, size) slice or
None), the form of comfy/lora.py's key maps (`to_load`); `lora_targets` adds the errors for files that do not
fit, and both `read_lora` and the ComfyUI loader (nodes/lora.py) go through it.

Merging: each weight a LoRA touches is recomputed as original + sum(strength x scale x up @ down) over the
applied LoRAs, in float32 and rounded once to the weight's dtype, in the weight's own memory. The originals
are kept (a CPU copy) until the last LoRA touching them goes. Sampling then runs the plain weights: no extra
matmul per step. The weights keep their addresses, so captured CUDA graphs (keyed by weight addresses) stay
valid and replay the merged values: nothing is re-captured, nothing stale is replayed.
"""
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from .checkpoints import CheckpointError, read_checkpoint
from .transformer import DIFFUSERS_BLOCK_NAMES, DIFFUSERS_FUSED, DIFFUSERS_NAMES

log = logging.getLogger(__name__)

# Prefixes a file may put before the module name: diffusers' pipeline component, PEFT's wrapper, ComfyUI's
# paths of our DiT in its MODEL (what ComfyUI's LoRA training and "Extract and Save LoRA" nodes write, and its
# generic kohya form), other ComfyUI model paths, kohya / OneTrainer's component prefixes (followed by the
# underscored module name).
FILE_PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.transformer.", "lora_unet_transformer_",
                 "model.diffusion_model.", "diffusion_model.", "lora_transformer_", "lora_unet_")
# A key = module name + "." + what it holds (LoRA factors, alpha, or another adapter's tensors).
KEY = re.compile(r"(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_down|lora_up|lora_mid|alpha|dora_scale|"
                 r"lora_magnitude_vector|hada_\w+|lokr_\w+)(?:\.[\w.]+)?")
UNMERGEABLE = {"hada_": "LyCORIS LoHa", "lokr_": "LyCORIS LoKr", "dora_scale": "DoRA",
               "lora_magnitude_vector": "DoRA (PEFT)", "lora_mid": "LoCon with a Tucker mid factor"}
# Module names of other model families, for the error a LoRA made for one of them gets.
FAMILIES = {"single_transformer_blocks": "Flux", "double_blocks": "Flux", "joint_blocks": "SD3",
            "input_blocks": "SD 1.x / SDXL", "down_blocks": "SD 1.x / SDXL", "lora_unet_down": "SD 1.x / SDXL",
            "lora_te": "a text encoder", "text_encoder": "a text encoder", "noise_refiner": "Lumina 2",
            "img_mlp": "Qwen-Image", "blocks.0.self_attn": "Wan"}


class Target(NamedTuple):
    """Where a file module's update goes: a parameter of SanaTransformer and, for diffusers' q/k/v (k/v) of
    our fused projections, the (dim, offset, size) rows of it (comfy/lora.py's slice form), else None."""
    key: str  # e.g. "blocks.0.attn.qkv.weight"
    slice: tuple | None  # e.g. (0, 64, 64): rows 64..127 (to_k of a width-64 model)


def key_map(shapes) -> dict:
    """Every module name a LoRA may use for a weight of the model with these parameter shapes (name -> shape,
    original names), without a file prefix, dotted and underscored (kohya) -> Target."""
    targets = {}
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) < 2 or ".depth_conv." in key:
            continue  # norms, and the depthwise conv (PEFT cannot merge LoRAs on grouped convs)
        module = key[:-len(".weight")]
        targets[module] = Target(key, None)
        for name, part_slice in _diffusers_names(module, shape[0]):
            targets[name] = Target(key, part_slice)
    return {**targets, **{name.replace(".", "_"): t for name, t in targets.items()}}


def _diffusers_names(module: str, rows: int) -> list:
    """[(diffusers module name, slice or None)] of one of our modules: transformer.py's load-time name
    maps read backwards (fused tensors give one name per part)."""
    name = module + "."
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m is None:
        return [((theirs + name[len(ours):])[:-1], None) for theirs, ours in DIFFUSERS_NAMES.items()
                if ours.endswith(".") and name.startswith(ours)]
    block, rest = f"transformer_blocks.{m[1]}.", m[2]
    if rest in DIFFUSERS_FUSED:
        parts = DIFFUSERS_FUSED[rest]
        size = rows // len(parts)
        return [(block + part[:-1], (0, i * size, size)) for i, part in enumerate(parts)]
    return [(block + theirs[:-1], None) for theirs, ours in DIFFUSERS_BLOCK_NAMES.items() if ours == rest]


def split_key(key: str):
    """(module name, part) of a LoRA key, e.g. ("transformer.transformer_blocks.0.attn1.to_q", "lora_A"),
    or None for a key that holds no adapter tensor."""
    m = KEY.fullmatch(key)
    return (m["module"], m["part"]) if m else None


def match_keys(keys, shapes) -> tuple[dict, list]:
    """The one name mapping: ({module name as in the file: Target}, [keys that match nothing]). `shapes`:
    the model's parameter names -> shapes (SanaTransformer.state_dict(), original names)."""
    names = key_map(shapes)
    targets, unmatched = {}, []
    for key in keys:
        split = split_key(key)
        target = None
        if split is not None:
            module = split[0]
            target = names.get(module)
            for prefix in FILE_PREFIXES:
                if target is None and module.startswith(prefix):
                    target = names.get(module[len(prefix):])
        if target is None:
            unmatched.append(key)
        else:
            targets[split[0]] = target
    return targets, unmatched


def detect_format(keys) -> str:
    """The kind of file, for messages: the adapter type and the naming (diffusers, kohya, original)."""
    keys = list(keys)
    parts = {s[1] for s in map(split_key, keys) if s}
    for marker, kind in UNMERGEABLE.items():
        if any(p.startswith(marker) for p in parts):
            return kind
    text = " ".join(keys[:2000])
    if "lora_transformer_" in text:
        return "kohya / OneTrainer LoRA"
    naming = "original NVlabs names" if re.search(r"(^|[._])blocks[._]\d+[._](attn|cross_attn|mlp)[._]", text) \
        else "diffusers names"
    factors = "diffusers / PEFT" if parts & {"lora_A", "lora_B"} else "kohya"
    return f"{factors} LoRA ({naming})"


# ----------------------------------------------------------------------------- reading

@dataclass
class LoraUpdate:
    """One module's update: W[slice] += strength * scale * up @ down (and bias[slice] += strength * scale * bias)."""
    module: str  # name in the file
    target: Target
    up: torch.Tensor  # (out, rank, ...) lora_B / lora_up
    down: torch.Tensor  # (rank, in, ...) lora_A / lora_down
    scale: float  # alpha / rank (alpha / sqrt(rank) for rsLoRA)
    bias: torch.Tensor | None = None  # (out,) lora_B.bias (PEFT's lora_bias)

    def keys(self) -> set:
        """The model parameters it changes: the target weight, and its bias when the LoRA has one."""
        return {self.target.key} | ({self.target.key[:-len("weight")] + "bias"} if self.bias is not None else set())

    def delta(self, key: str, device) -> torch.Tensor:
        """The float32 change of parameter `key` (the weight or the bias) at strength 1: (rows, in) or (rows,)."""
        if key == self.target.key:
            up, down = (t.to(device).float() for t in (self.up, self.down))
            return self.scale * (up.flatten(1) @ down.flatten(1))
        return self.scale * self.bias.to(device).float()


@dataclass(eq=False)
class Lora:
    """A LoRA file read for one model: its updates and the keys that matched nothing (reported)."""
    name: str
    format: str
    updates: list
    unmatched: list = field(default_factory=list)

    def keys(self) -> set:
        """The model parameters it changes."""
        return set().union(*(u.keys() for u in self.updates))


def peft_settings(metadata: dict) -> dict:
    """The transformer's PEFT LoraConfig stored by diffusers' save_lora_weights (`lora_adapter_metadata`
    JSON, keys "transformer.lora_alpha", ...), without the prefix; {} when the file has none."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        settings = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (ValueError, TypeError):
        return {}
    return {k[len("transformer."):]: v for k, v in settings.items() if k.startswith("transformer.")}


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a pattern matches the end of the module name."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def module_alpha(module: str, rank: int, tensors: dict, settings: dict) -> float:
    """alpha of a module such that its scale is alpha / rank: the file's `.alpha` tensor, else the PEFT
    settings (alpha_pattern, lora_alpha; rsLoRA's alpha / sqrt(rank) folded in), else rank (scale 1)."""
    if f"{module}.alpha" in tensors:
        return float(tensors[f"{module}.alpha"])
    if "lora_alpha" not in settings:
        return float(rank)
    name = module[len("transformer."):] if module.startswith("transformer.") else module
    alpha = float(_pattern_value(settings.get("alpha_pattern"), name, settings["lora_alpha"]))
    return alpha * math.sqrt(rank) if settings.get("use_rslora") else alpha


def lora_targets(name: str, tensors: dict, shapes) -> tuple[str, dict, list]:
    """(format, {file module: Target}, [unmatched keys]) of a LoRA's tensors for a model with these parameter
    shapes; CheckpointError for a file that holds no adapter or whose keys all miss the SANA transformer
    (a LoRA for another family: named when its keys tell). What the library and the ComfyUI loader share."""
    if not any(split_key(k) for k in tensors):
        raise CheckpointError(f"{name} is not a LoRA: none of its {len(tensors)} keys holds LoRA factors "
                              f"(lora_A/lora_B or lora_down/lora_up), e.g. {', '.join(sorted(tensors)[:3])}")
    targets, unmatched = match_keys(tensors, shapes)
    if not targets:
        text = " ".join(sorted(tensors)[:2000])
        family = next((f for marker, f in FAMILIES.items() if marker in text), "another model family")
        raise CheckpointError(f"{name} is a LoRA for {family}, not for a SANA transformer: none of its "
                              f"{len(tensors)} keys names a SANA module (e.g. {', '.join(sorted(tensors)[:3])})")
    depth = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
    blocks = [int(m[1]) for m in (re.search(r"(?:^|[._])blocks[._](\d+)[._]", k) for k in unmatched) if m]
    if blocks and max(blocks) >= depth:
        raise CheckpointError(f"{name} was made for a deeper SANA model: it has LoRA factors for block {max(blocks)}, "
                              f"this model has blocks 0..{depth - 1} (e.g. a Sana 1.5 4.8B LoRA on a 1.6B model)")
    if unmatched:
        log.warning("%s: %d key(s) match nothing in the SANA transformer and were not applied: %s", name,
                    len(unmatched), ", ".join(unmatched[:20]) + (" ..." if len(unmatched) > 20 else ""))
    return detect_format(tensors), targets, unmatched


def read_lora_file(path) -> tuple[dict, dict]:
    """(tensors, metadata) of a LoRA file (.safetensors, .pt) or folder (diffusers' pytorch_lora_weights, or a
    PEFT save_pretrained folder, whose adapter_config.json becomes the `lora_adapter_metadata`)."""
    tensors, metadata = read_checkpoint(path, weight_names=("pytorch_lora_weights", "adapter_model"))
    peft_config = Path(path) / "adapter_config.json"
    if peft_config.is_file() and "lora_adapter_metadata" not in metadata:
        metadata["lora_adapter_metadata"] = {f"transformer.{k}": v for k, v in json.loads(
            peft_config.read_text()).items()}
    return tensors, metadata


def read_lora(path, model, *, tensors=None, metadata=None) -> Lora:
    """Read a LoRA file (.safetensors, .pt, or a diffusers or PEFT folder) for `model` (a SanaTransformer); or
    `tensors` (+ `metadata`) already read, `path` then only names it. Errors (CheckpointError) for a file
    that is no LoRA, a LoRA for another model family or another SANA width (with the shapes), and for
    adapters the library does not merge (LoHa, LoKr, DoRA: named). Keys that match nothing are listed in
    `.unmatched` and logged."""
    name = Path(path).name
    if tensors is None:
        tensors, metadata = read_lora_file(path)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    kind, targets, unmatched = lora_targets(name, tensors, shapes)
    if kind in UNMERGEABLE.values():
        raise CheckpointError(f"{name} is a {kind} file: the SANA library merges plain LoRA only (lora_A/lora_B "
                              f"or lora_down/lora_up factors); load {kind} files in ComfyUI, whose weight "
                              f"adapters apply them")
    settings = peft_settings(metadata or {})
    updates = []
    for module, target in targets.items():
        up, down = (tensors.get(f"{module}.lora_B.weight"), tensors.get(f"{module}.lora_A.weight"))
        if up is None:
            up, down = tensors.get(f"{module}.lora_up.weight"), tensors.get(f"{module}.lora_down.weight")
        if up is None or down is None:
            raise CheckpointError(f"{name}: module {module} lacks its up or down factor (lora_B/lora_A or "
                                  f"lora_up/lora_down): the file is incomplete")
        rank = down.shape[0]
        update = LoraUpdate(module, target, up, down, module_alpha(module, rank, tensors, settings) / rank,
                            tensors.get(f"{module}.lora_B.bias"))
        _check_shape(name, update, shapes, model)
        updates.append(update)
    log.info("%s: %s, %d module(s)", name, kind, len(updates))
    return Lora(name, kind, updates, unmatched)


def _check_shape(name, update: LoraUpdate, shapes, model) -> None:
    """A LoRA for another SANA width (or a damaged one) is refused with both shapes; NaN factors too."""
    shape = shapes[update.target.key]
    rows = update.target.slice[2] if update.target.slice else shape[0]
    cols = math.prod(shape[1:])
    up, down = update.up, update.down
    ok = (up.shape[0] == rows and math.prod(down.shape[1:]) == cols and up.flatten(1).shape[1] == down.shape[0])
    if update.bias is not None:
        bias = update.target.key[:-len("weight")] + "bias"
        ok = ok and bias in shapes and tuple(update.bias.shape) == (rows,)
    factors = (up, down) if update.bias is None else (up, down, update.bias)
    if ok and not all(torch.isfinite(t).all() for t in factors):
        raise CheckpointError(f"{name} is damaged: the factors of {update.module} hold NaN or infinite values; "
                              f"download or export it again")
    if not ok:
        part = f" rows {update.target.slice[1]}..{update.target.slice[1] + rows - 1}" if update.target.slice else ""
        raise CheckpointError(
            f"{name} does not fit this model: {update.module} has factors up {list(up.shape)} x down "
            f"{list(down.shape)} (a {up.shape[0]} x {math.prod(down.shape[1:])} update), but the model's "
            f"{update.target.key}{part} is {rows} x {cols}; the model is {model.config.variant} (width "
            f"{model.config.width}): this LoRA was trained for another SANA model")


# ----------------------------------------------------------------------------- merging

@dataclass
class MergedLoras:
    """The LoRAs merged into one model (kept on it as `model.merged_loras`) and the original weights they
    changed (CPU copies, pinned when the model is on a GPU)."""
    applied: list = field(default_factory=list)  # [(Lora, strength)] in the order applied
    originals: dict = field(default_factory=dict)  # parameter key -> original tensor


def merged_loras(model) -> MergedLoras:
    state = getattr(model, "merged_loras", None)
    if state is None:
        state = model.merged_loras = MergedLoras()
    return state


def apply_lora(model, lora, strength: float = 1.0) -> Lora:
    """Merge a LoRA (a Lora from read_lora, or a path) into the model's weights at `strength` (negative
    subtracts it); stacks with the LoRAs already applied. Returns the Lora (for remove_lora)."""
    if not isinstance(lora, Lora):
        lora = read_lora(lora, model)
    state = merged_loras(model)
    if any(lora is applied for applied, _ in state.applied):
        raise ValueError(f"{lora.name} is already applied; remove_lora it first, or read the file again to "
                         f"apply it twice")
    params = dict(model.state_dict(keep_vars=True))
    for key in lora.keys() - set(state.originals):
        p = params[key].detach()
        state.originals[key] = torch.empty(p.shape, dtype=p.dtype, pin_memory=p.is_cuda).copy_(p)
    state.applied.append((lora, float(strength)))
    try:
        _recompute(model, state, lora.keys())
    except BaseException:  # e.g. out of memory half way: back to the weights before this LoRA
        state.applied.pop()
        _recompute(model, state, lora.keys())
        raise
    return lora


def remove_lora(model, lora: Lora) -> None:
    """Take one applied LoRA out; the weights no other LoRA touches get their originals back, bit for bit."""
    state = merged_loras(model)
    if not any(lora is applied for applied, _ in state.applied):
        raise ValueError(f"{lora.name} is not applied to this model")
    state.applied = [(a, s) for a, s in state.applied if a is not lora]
    _recompute(model, state, lora.keys())


def unload_loras(model) -> None:
    """Take every LoRA out: the original weights back, bit for bit."""
    state = merged_loras(model)
    keys = set(state.originals)
    state.applied = []
    _recompute(model, state, keys)


def loras_merged(model, loras) -> bool:
    """Whether the merged LoRAs are exactly `loras` ([(Lora, strength)], in order)."""
    applied = merged_loras(model).applied
    return [(id(lora), s) for lora, s in applied] == [(id(lora), float(s)) for lora, s in loras]


def set_loras(model, loras) -> None:
    """Make the merged LoRAs exactly `loras` ([(Lora, strength)], in order); nothing to do when they already are
    (sana-run's stand-in MODEL carries its LoRAs and the host sets them before the DiT computes)."""
    if loras_merged(model, loras):
        return
    unload_loras(model)
    for lora, strength in loras:
        apply_lora(model, lora, strength)


@torch.no_grad()
def _recompute(model, state: MergedLoras, keys) -> None:
    """Each of `keys` := original + the applied LoRAs' deltas (float32, rounded once), in its own memory.
    An original no applied LoRA touches any more is dropped."""
    params = dict(model.state_dict(keep_vars=True))
    touched, updates = set(), {}  # parameter key -> [(update, strength)]
    for lora, strength in state.applied:
        touched |= lora.keys()
        for update in lora.updates if strength != 0 else ():
            for key in update.keys() & set(keys):
                updates.setdefault(key, []).append((update, strength))
    for key in keys:
        param = params[key]
        weight = state.originals[key].to(param.device, non_blocking=True).to(torch.float32, copy=True)
        layer = model.get_submodule(key.rpartition(".")[0])
        scaled = key.endswith(".weight") and hasattr(layer, "set_weight")  # fp8 x scales (sana_core.fp8.Fp8Linear)
        if scaled:
            weight = layer.convert_weight(weight, inplace=True)
        for update, strength in updates.get(key, ()):
            rows = weight.narrow(*update.target.slice) if update.target.slice else weight
            rows += strength * update.delta(key, param.device).reshape(rows.shape)
        param.copy_(layer.set_weight(weight, return_weight=True) if scaled else weight)
        if key not in touched:
            del state.originals[key]
