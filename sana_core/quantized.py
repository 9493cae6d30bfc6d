"""Quantized weights kept quantized in memory and dequantized per layer at run time.

Two families of stored forms, read by quantized_files.py:
- fp8 (float8_e4m3fn / float8_e5m2): the weight's own shape, with ComfyUI's scaled-fp8 rule
  weight = fp8 * scale (`scale_weight`: one float32 per tensor, or one per output row after q/k/v fusion;
  absent in plain fp8 files, where the scale is 1). `scale_input` is kept for fp8 matmuls, unused here.
- GGUF blocks (Q8_0, Q5_0, Q4_0, Q4_K, Q5_K, Q6_K): uint8 of shape (rows, bytes per row), each row the
  blocks of one output channel (sana_core.kernels.dequantize_blocks decodes them).

`quantized_ops` is an `operations` set (ComfyUI's comfy.ops style): Linear and Conv2d that behave as torch's
until they hold a QuantizedTensor, then keep its stored form as their `weight` parameter (so memory
managers move and count the real bytes) and dequantize it at every call into the input's dtype and device.
ComfyUI's weight patches (a LoRA) follow its own fp8 layers' convention: `convert_weight` turns the stored form
(read as float32) into the float weight, `set_weight` takes the patched float weight. A layer ComfyUI loads
whole is patched once (its weight parameter then is the patched weight in the compute dtype until ComfyUI puts
the stored form back); a layer it leaves on the CPU (low VRAM) keeps its stored form and its `weight_function`
patches (ComfyUI's LowVramPatch: convert, patch, set) turn the stored form into the patched weight at each call.
load_quantized_weights puts a file's quantized tensors into the DiT's blocks: every Linear and 1x1 Conv2d
there (attention projections and the Mix-FFN's 1x1 convs, ~97% of the weights) keeps its stored form;
every other quantized tensor (embedders, t_block, final layer, depthwise conv, norms) is dequantized once
at load, at the model's dtype.
"""
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoints import CheckpointError, load_weights
from .kernels import dequantize_blocks, dequantize_fp8

log = logging.getLogger(__name__)

FP8 = {name: getattr(torch, "float8_" + name[4:]) for name in ("fp8_e4m3fn", "fp8_e5m2")
       if hasattr(torch, "float8_" + name[4:])}  # ComfyUI's names -> torch dtypes
QUANTIZATION_KEY = "sana_core.quantization"  # metadata entry the readers add: what the file holds


@dataclass
class QuantizedTensor:
    """A tensor as stored: `data` fp8 of `shape`, or uint8 (rows, bytes per row) of GGUF blocks."""
    data: torch.Tensor
    qtype: str  # "fp8_e4m3fn", "fp8_e5m2" or a GGUF block format ("Q8_0", ...)
    shape: torch.Size  # the float tensor's
    scale: torch.Tensor | None = None  # fp8: float32, () or (rows,); None: 1
    input_scale: torch.Tensor | None = None  # fp8: ComfyUI's scale_input (activations / scale -> fp8)

    @property
    def ndim(self):
        return len(self.shape)

    def dequantize(self, dtype=torch.float32, device=None) -> torch.Tensor:
        return dequantize(self.data, self.qtype, self.shape, dtype, self.scale, device)


def dequantize(data, qtype, shape, dtype, scale=None, device=None) -> torch.Tensor:
    """The float tensor of `shape` that a stored form encodes, in dtype on device (default: data's);
    fp8 x scale is computed in float32 (ComfyUI multiplies in the compute dtype, rounding the scale)."""
    data = data.to(device or data.device, non_blocking=True)
    if qtype in FP8:
        return dequantize_fp8(data, None if scale is None else scale.to(data.device), dtype)
    return dequantize_blocks(data, qtype, dtype).reshape(shape)


def cat_rows(parts):
    """torch.cat(parts, dim=0) for diffusers' separate q/k/v (k/v) tensors fused into one. GGUF rows of one
    format concatenate as they are (a row's blocks are its own: exact); fp8 of one dtype too, each part's
    scale repeated over its rows; any other mix is dequantized and fused in float32."""
    if not any(isinstance(p, QuantizedTensor) for p in parts):
        return torch.cat(parts, dim=0)
    first = parts[0]
    if not all(isinstance(p, QuantizedTensor) and p.qtype == first.qtype and p.shape[1:] == first.shape[1:]
               for p in parts):
        return torch.cat([p.dequantize() if isinstance(p, QuantizedTensor) else p.float() for p in parts], dim=0)
    shape = torch.Size([sum(p.shape[0] for p in parts), *first.shape[1:]])
    data = torch.cat([p.data for p in parts], dim=0)
    if first.qtype not in FP8:
        return QuantizedTensor(data, first.qtype, shape)
    scales = [torch.ones(()) if p.scale is None else p.scale.float() for p in parts]
    scale = None
    if any(p.scale is not None for p in parts):
        scale = torch.cat([s.expand(p.shape[0]) for s, p in zip(scales, parts)])
        scale = scale[0] if bool((scale == scale[0]).all()) else scale
    inputs = [p.input_scale for p in parts]
    same_input = all(s is not None and torch.equal(s, inputs[0]) for s in inputs)
    return QuantizedTensor(data, first.qtype, shape, scale, inputs[0] if same_input else None)


# ----------------------------------------------------------------------------- layers

class QuantizedLayer:
    """What quantized_ops.Linear and .Conv2d share: the stored form and its dequantization."""
    comfy_cast_weights = True  # ComfyUI: this layer casts (here: dequantizes) its weight at every call
    weight_function = []  # ComfyUI's low-VRAM patches, applied to the dequantized weight
    bias_function = []
    qtype = None  # None: a plain float layer
    weight_shape = None
    compute_dtype = None  # a quantized layer's float dtype (the model's)

    def hold(self, q: QuantizedTensor, device) -> None:
        """Keep q's stored form as this layer's weight (on device); the bias is left as it is."""
        if tuple(q.shape) != tuple(self.weight.shape):
            raise CheckpointError(f"quantized weight of shape {list(q.shape)}, the layer expects "
                                  f"{list(self.weight.shape)}")
        self.compute_dtype = self.weight.dtype  # the model's: what a patched weight is kept in
        self.weight = nn.Parameter(q.data.to(device), requires_grad=False)
        self.qtype, self.weight_shape = q.qtype, q.shape
        for name, value in (("scale_weight", q.scale), ("scale_input", q.input_scale)):
            if value is not None:
                self.register_parameter(name, nn.Parameter(value.to(device, torch.float32), requires_grad=False))

    def stored(self) -> bool:
        """Whether the weight parameter holds the stored form (not a plain or a patched float weight)."""
        return self.qtype is not None and (self.weight.dtype == torch.uint8 or self.weight.dtype in FP8.values())

    def dequantized_weight(self, dtype, device) -> torch.Tensor:
        """The weight to compute with, in dtype on device (ComfyUI's patches applied)."""
        if not self.stored():  # a plain layer, or one ComfyUI patched whole
            weight = self.weight.to(device=device, dtype=dtype)
        elif not self.weight_function:
            return dequantize(self.weight, self.qtype, self.weight_shape, dtype, getattr(self, "scale_weight", None),
                              device)
        else:  # ComfyUI's low-VRAM patches (its LowVramPatch: convert, patch, set) take the stored form as float32
            weight = self.weight.to(device).float()
        for f in self.weight_function:
            weight = f(weight)
        return weight.to(dtype)

    def convert_weight(self, weight, inplace=False) -> torch.Tensor:
        """ComfyUI (patching): the float32 weight that the stored form, read as float32, encodes."""
        if not self.stored():
            return weight
        data = weight.to(self.weight.dtype)  # exact: bytes 0..255 / fp8 values
        return dequantize(data, self.qtype, self.weight_shape, torch.float32, getattr(self, "scale_weight", None))

    def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False):
        """ComfyUI (patching): the patched float weight: returned (return_weight, a low-VRAM call), else kept as
        this layer's weight in the compute dtype until ComfyUI restores the stored form."""
        if return_weight:
            return weight
        dtype = self.compute_dtype if self.stored() else self.weight.dtype
        self.weight = nn.Parameter(weight.to(dtype), requires_grad=False)

    def cast_bias(self, x):
        bias = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        for f in self.bias_function:
            bias = f(bias)
        return bias

    def extra_repr(self):
        return super().extra_repr() + (f", {self.qtype}" if self.qtype else "")


class quantized_ops:  # noqa: N801 (named like ComfyUI's operation sets: comfy.ops.manual_cast, ...)
    class Linear(QuantizedLayer, nn.Linear):
        def reset_parameters(self):  # the weights come from a file
            return None

        def forward(self, x):
            return F.linear(x, self.dequantized_weight(x.dtype, x.device), self.cast_bias(x))

    class Conv2d(QuantizedLayer, nn.Conv2d):
        def reset_parameters(self):
            return None

        def forward(self, x):
            return self._conv_forward(x, self.dequantized_weight(x.dtype, x.device), self.cast_bias(x))


def _quantizable(module) -> bool:
    """Layers that keep a stored form: Linear, and Conv2d with a 1x1 kernel (a matmul)."""
    if isinstance(module, nn.Conv2d):
        return module.kernel_size == (1, 1) and module.groups == 1
    return isinstance(module, nn.Linear)


def _as_quantized_layer(module):
    """A quantized_ops layer of module's structure, on the meta device (hold() then fills its weight)."""
    kw = dict(bias=module.bias is not None, device="meta", dtype=module.weight.dtype)
    if isinstance(module, nn.Conv2d):
        return quantized_ops.Conv2d(module.in_channels, module.out_channels, module.kernel_size, **kw)
    return quantized_ops.Linear(module.in_features, module.out_features, **kw)


class _Dequantized(Mapping):
    """The tensors load_weights still fills: quantized ones dequantized on access (one at a time)."""

    def __init__(self, tensors, held):
        self.tensors, self.held = tensors, held

    def __getitem__(self, name):
        t = self.tensors[name]
        return t.dequantize() if isinstance(t, QuantizedTensor) else t

    def __iter__(self):
        return (k for k in self.tensors if k not in self.held)

    def __len__(self):
        return sum(1 for _ in self)


def load_quantized_weights(model, tensors, metadata, *, device, dtype, prefix="blocks."):
    """load_weights for files that quantized_files.read_quantized_checkpoint read (`metadata` says what they
    hold): each Linear / 1x1 Conv2d under `prefix` whose weight is quantized becomes a quantized_ops layer
    holding it on `device`; everything else loads as load_weights loads it (quantized tensors dequantized)."""
    if QUANTIZATION_KEY not in metadata:
        return load_weights(model, tensors, device=device, dtype=dtype)
    held = set()
    for name, module in list(model.named_modules()):
        key = name + ".weight"
        q = tensors.get(key) if name.startswith(prefix) and _quantizable(module) else None  # one read (fusion)
        if not isinstance(q, QuantizedTensor):
            continue
        layer = _as_quantized_layer(module)
        try:
            layer.hold(q, device)
        except CheckpointError as e:
            raise CheckpointError(f"tensor {key}: {e}") from None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        held.add(key)
    log.info("%s: %d layers keep their quantized weights", metadata[QUANTIZATION_KEY], len(held))
    return load_weights(model, _Dequantized(tensors, held), device=device, dtype=dtype)


def quantization_summary(model) -> dict:
    """{qtype: number of layers} of a loaded model's quantized layers (for logs, benchmarks, tests)."""
    counts = {}
    for module in model.modules():
        if isinstance(module, QuantizedLayer) and module.qtype:
            counts[module.qtype] = counts.get(module.qtype, 0) + 1
    return counts

