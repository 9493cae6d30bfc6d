"""Layers from ComfyUI-style `operations`, and when our fast paths may read a layer's weights themselves.

`SanaTransformer(config, operations=ops)` builds its Linear and Conv2d layers as ops.Linear / ops.Conv2d
(ComfyUI passes comfy.ops.disable_weight_init, manual_cast, its fp8 ops, ...; None: torch.nn). Such a layer
may compute with other tensors than its .weight / .bias: copies cast to the input's dtype and device at each
call (`comfy_cast_weights`: manual cast, and the layers low-VRAM loading leaves on the CPU), with weight
patches applied on the fly (`weight_function` / `bias_function`: a LoRA on a partially loaded model). Our
fast paths that read weights directly (the Mix-FFN 1x1 convolutions as matmuls, the depthwise conv + GLU
kernel) run only when `reads_weights_directly(layer)`; otherwise the layer is called (the PyTorch path).
Plain parameters outside such layers (adaLN tables, RMSNorm weights) are taken with `cast_like` where used,
as ComfyUI's own models do: low-VRAM loading may leave them on the CPU, or in a storage dtype.
"""
import torch


def reads_weights_directly(layer: torch.nn.Module) -> bool:
    """Whether code may compute with layer.weight / layer.bias as they are instead of calling the layer:
    False when the layer takes its weights through ComfyUI's cast path (comfy_cast_weights set, or weight /
    bias functions to apply)."""
    return not (getattr(layer, "comfy_cast_weights", False) or getattr(layer, "weight_function", None)
                or getattr(layer, "bias_function", None))


def matmul_weight(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The weight code may multiply x by itself (the Mix-FFN's 1x1 convs run as matmuls), or None when the
    layer must be called instead: a quantized layer's weight dequantized into x's dtype and device (its
    weight functions applied: sana_core.quantized), a plain layer's parameter as it is."""
    if hasattr(layer, "dequantized_weight"):
        return layer.dequantized_weight(x.dtype, x.device)
    return layer.weight if reads_weights_directly(layer) else None


def cast_like(param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A plain parameter on x's device in x's dtype (itself when it already is)."""
    return param.to(device=x.device, dtype=x.dtype)
