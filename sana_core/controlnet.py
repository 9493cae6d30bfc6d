"""SANA's ControlNet: copies of the first N DiT blocks that read a hint latent (an edge map encoded by the
DC-AE) and add a projection of each block's output into the base model's residual stream.

Two graphs exist, and the same weights give results tens of percent apart, so each file runs the graph
it was trained with (`graph=` overrides):
- "official" (NVlabs `SanaMSControlNet`, the released HED checkpoints, original layout): base block 0 runs
  first; copied block 0 reads its output plus before_proj(x_embedder(hint)); copied block j's after_proj
  output is added to base block j's output (j = 0..N-1). Time and caption are the base model's.
- "diffusers" (`SanaControlNetModel`, diffusers layout): the ControlNet embeds the latent, time and
  caption itself; copied block 0 reads x_embedder(x) + before_proj(x_embedder(hint)) (diffusers names:
  patch_embed, input_block); copied block j's after_proj (controlnet_blocks.j) output is added to base
  block j + 1's output.

    net = load_controlnet("Sana_1600M_1024px_BF16_ControlNet_HED.pth")
    hint = encode_hint(autoencoder, edge_image, width, height)               # (B, 32, h, w), scaled latent
    caption = model.encode_caption(context, mask)
    control = Controls([net.prepare(hint, model, caption, context, strength=1.0)])
    v = model(x, t * 1000, caption, control=control)
"""
import logging
import re
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoints import CheckpointError, default_device, default_dtype, describe, guess_component, load_weights, \
    read_checkpoint, strip_prefix
from .operations import reads_weights_directly
from .transformer import (PREFIXES, Block, Caption, CaptionEmbedder, FusedTensors, RMSNorm, SanaConfig,
                          TimestepEmbedder, _parse_config, attention_heads, block_output, diffusers_to_original,
                          sincos_pos_embed)

log = logging.getLogger(__name__)

OFFICIAL, DIFFUSERS = "official", "diffusers"  # the graphs
GRAPHS = (OFFICIAL, DIFFUSERS)
EMBEDDERS = ("t_embedder.", "t_block.", "y_embedder.", "attention_y_norm.")  # the diffusers graph's own
OTHER_FAMILIES = {  # a key fragment -> the family whose ControlNets carry it
    "input_hint_block.": "Stable Diffusion / SDXL (UNet)", "controlnet_cond_embedding.": "Stable Diffusion / SDXL "
    "(diffusers UNet)", "controlnet_x_embedder.": "Flux", "pos_embed_input.": "Stable Diffusion 3",
    "controlnet_mode_embedder.": "Flux (union)",
}


class ControlNet(nn.Module):
    """Parameters (one naming for both layouts): x_embedder.proj (the hint's patch embedder, 1x1 conv 32 -> C),
    blocks.j (copied DiT blocks), before_proj (Linear C -> C, on the embedded hint), after_proj.j (Linear
    C -> C, on copied block j's output); the diffusers graph also has t_embedder, t_block, y_embedder and
    attention_y_norm. config.depth is N, the number of copied blocks. operations: where the Linear and Conv2d
    layers come from, as for SanaTransformer (ComfyUI's comfy.ops: partial low-VRAM loading; None: torch.nn)."""

    def __init__(self, config: SanaConfig, graph: str, *, dtype=None, device=None, operations=None):
        super().__init__()
        if graph not in GRAPHS:
            raise ValueError(f"graph must be one of {', '.join(GRAPHS)}, got {graph!r}")
        cfg, kw, ops = config, dict(dtype=dtype, device=device), operations or nn
        self.config, self.graph = cfg, graph
        self.x_embedder = nn.Module()
        self.x_embedder.proj = ops.Conv2d(cfg.in_channels, cfg.width, 1, **kw)
        if graph == DIFFUSERS:
            self.t_embedder = TimestepEmbedder(cfg.width, **kw, ops=ops)
            self.t_block = nn.Sequential(nn.SiLU(), ops.Linear(cfg.width, 6 * cfg.width, **kw))
            self.y_embedder = CaptionEmbedder(cfg.caption_dim, cfg.width, **kw, ops=ops)
            self.attention_y_norm = RMSNorm(cfg.width, **kw)
        self.blocks = nn.ModuleList([Block(cfg, **kw, ops=ops) for _ in range(cfg.depth)])
        self.before_proj = ops.Linear(cfg.width, cfg.width, **kw)
        self.after_proj = nn.ModuleList([ops.Linear(cfg.width, cfg.width, **kw) for _ in range(cfg.depth)])

    @property
    def dtype(self):
        return self.before_proj.weight.dtype

    def embed(self, latent):  # (B, 32, h, w) -> (B, h w, C)
        tokens = self.x_embedder.proj(latent.to(self.dtype)).flatten(2).transpose(1, 2)
        cfg = self.config
        if self.graph == DIFFUSERS and cfg.pe_interpolation is not None:  # diffusers' PatchEmbed adds it to both
            pe = sincos_pos_embed(cfg.width, *latent.shape[-2:], cfg.pe_interpolation, cfg.base_size)
            tokens = (tokens.float() + pe.to(tokens.device)).to(tokens.dtype)
        return tokens

    def prepare(self, hint, base, caption: Caption, context, strength=1.0) -> "Control":
        """What stays the same over a sampling call: the embedded hint and the copied blocks' caption side.
        hint (1 or B, 32, h, w) DC-AE latent scaled as the DiT's input (encode_hint); base the SanaTransformer
        it drives; caption = base.encode_caption(context, mask) and context (B, T, caption_dim) the Gemma hidden
        states it was made of; strength scales what the ControlNet adds (a float or a 0-d tensor)."""
        device = caption.kv[0][0].device  # where the model computes (its weights may be partly elsewhere)
        if reads_weights_directly(self.before_proj) and self.before_proj.weight.device != device:
            raise ValueError(f"the ControlNet is on {self.before_proj.weight.device}, the model computes on {device}: "
                             f"load both on one device")
        self.check_fits(base.config)
        B = context.shape[0]
        if hint.ndim != 4 or hint.shape[1] != self.config.in_channels or hint.shape[0] not in (1, B):
            raise ValueError(f"the ControlNet hint has shape {list(hint.shape)}; expected [1 or {B}, "
                             f"{self.config.in_channels}, h, w] (the hint image encoded by the DC-AE: encode_hint)")
        hint = self.before_proj(self.embed(hint.to(device))).expand(B, -1, -1)  # (B, N, C)
        if self.graph == OFFICIAL:  # the copied blocks attend to the base model's caption embedding
            y = base.attention_y_norm(base.y_embedder(context.to(device, base.dtype))).to(self.dtype)
        else:
            y = self.attention_y_norm(self.y_embedder(context.to(device, self.dtype)))
        kv = tuple(block.cross_attn.caption_kv(y) for block in self.blocks)
        strength = strength.to(device, torch.float32) if isinstance(strength, torch.Tensor) else \
            torch.full((), float(strength), device=device)  # a fill, not a host copy: prepare may run in a graph
        return Control(self, hint, kv, caption.keep, strength)

    def check_fits(self, bcfg: SanaConfig) -> None:
        """A clear error when this ControlNet cannot drive a model of config `bcfg` (another width, too few
        blocks)."""
        cfg = self.config
        if cfg.width != bcfg.width:
            raise ValueError(f"this ControlNet was made for SANA models of width {cfg.width} ({_size(cfg.width)}); "
                             f"the model is {bcfg.variant} (width {bcfg.width}): use the ControlNet made for it")
        if cfg.depth >= bcfg.depth:
            raise ValueError(f"this ControlNet has {cfg.depth} blocks; the model ({bcfg.variant}) has only "
                             f"{bcfg.depth}: use the ControlNet made for it")
        if self.graph == DIFFUSERS and cfg.caption_dim != bcfg.caption_dim:
            raise ValueError(f"this ControlNet reads captions of width {cfg.caption_dim}; the model's are "
                             f"{bcfg.caption_dim} wide")

    def residuals(self, control: "Control", x, x0, timestep, t0, h, w) -> dict:
        """{base block index: (B, N, C)} to add to that block's output. x (B, 32, h, w) the model's input latent,
        x0 (B, N, C) base block 0's output, timestep (B,) t * 1000, t0 (B, 6C) the base model's adaLN input."""
        if control.hint.shape[:2] != x0.shape[:2]:
            raise ValueError(f"the ControlNet hint covers {control.hint.shape[0]} latents of {control.hint.shape[1]} "
                             f"tokens; the model is sampling {x0.shape[0]} of {h}x{w} = {h * w}: encode the hint "
                             f"image at the size of the image being made")
        if self.graph == OFFICIAL:
            c, first, t0 = x0.to(self.dtype) + control.hint, 0, t0.to(self.dtype)
        else:
            c, first = self.embed(x) + control.hint, 1
            t0 = self.t_block(self.t_embedder(timestep, self.dtype))  # (B, 6C)
        out = {}
        strength = control.strength.to(c.dtype)
        for j, (block, kv, proj) in enumerate(zip(self.blocks, control.kv, self.after_proj)):
            c = block_output(*block(c, None, kv, control.keep, t0, h, w))  # (B, N, C)
            out[first + j] = (proj(c) * strength).to(x0.dtype)  # the model's dtype (a ControlNet may differ)
        return out


class Control(NamedTuple):
    """One ControlNet prepared for a sampling call (ControlNet.prepare). A NamedTuple of tensors, so a CUDA
    graph of the step copies it in as a constant."""
    net: ControlNet
    hint: torch.Tensor  # (B, N, C) before_proj of the embedded hint
    kv: tuple  # per copied block: the caption's (k, v)
    keep: torch.Tensor | None  # (B, 1, 1, T) caption mask
    strength: torch.Tensor  # () float32

    def residuals(self, x, x0, timestep, t0, h, w) -> dict:
        return self.net.residuals(self, x, x0, timestep, t0, h, w)


class Controls(tuple):
    """Several prepared ControlNets, applied together (their residuals summed): SanaTransformer.forward's
    `control`."""

    def residuals(self, x, x0, timestep, t0, h, w) -> dict:
        out = {}
        for control in self:
            for i, r in control.residuals(x, x0, timestep, t0, h, w).items():
                out[i] = out[i] + r if i in out else r
        return out


def prepare_controls(controls, base, caption, context, groups=1) -> Controls | None:
    """(ControlNet, hint, strength) triples -> the Controls SanaTransformer.forward takes (None for none), for a
    batch of `groups` copies (CFG / PAG groups) of the hints' batch; caption and context as in prepare."""
    if not controls:
        return None
    return Controls(net.prepare(hint if hint.shape[0] == 1 else torch.cat([hint] * groups), base, caption, context,
                                strength) for net, hint, strength in controls)


def _size(width) -> str:
    return {1152: "Sana 0.6B", 2240: "Sana 1.6B / 4.8B"}.get(width, "a custom SANA width")


# ----------------------------------------------------------------------------- hint

def encode_hint(autoencoder, image, width, height) -> torch.Tensor:
    """The hint latent (B, 32, height/32, width/32), float32 on the autoencoder's device, as both pipelines make
    it: the image (PIL, or (B, 3, H, W) / (3, H, W) in [0, 1]) resized to the output size (bicubic), mapped to
    [-1, 1] and encoded by the DC-AE, times its scaling factor (DCAE.encode scales)."""
    from .pipeline import image_to_tensor
    pixels = image_to_tensor(image)  # (B, 3, H, W) in [0, 1], CPU
    if pixels.shape[-2:] != (height, width):
        pixels = F.interpolate(pixels, size=(height, width), mode="bicubic", align_corners=False,
                               antialias=True).clamp_(0, 1)
    with torch.no_grad():
        return autoencoder.encode(pixels * 2 - 1).float()


# ----------------------------------------------------------------------------- loading

def original_to_controlnet(tensors: dict, graph: str) -> dict:
    """An original NVlabs file (the whole model: base DiT + `controlnet.j.*`) -> our names: the ControlNet's
    blocks and projections, the patch embedder it embeds the hint with, and for the diffusers graph the time
    and caption embedders; the base blocks and final layer are left out."""
    keep = ("x_embedder.",) + (EMBEDDERS if graph == DIFFUSERS else ())
    out = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"controlnet\.(\d+)\.(copied_block|before_proj|after_proj)\.(.+)", key)
        if m and m[2] == "copied_block":
            out[f"blocks.{m[1]}.{m[3]}"] = value
        elif m and m[2] == "after_proj":
            out[f"after_proj.{m[1]}.{m[3]}"] = value
        elif m:
            out[f"before_proj.{m[3]}"] = value
        elif key.startswith(keep) and key != "y_embedder.y_embedding":
            out[key] = value
    return out


def diffusers_to_controlnet(tensors: dict, graph: str) -> FusedTensors:
    """A diffusers SanaControlNetModel -> our names (input_block -> before_proj, controlnet_blocks.j ->
    after_proj.j, the rest as the transformer's), without the embedders when the official graph runs it."""
    fused = diffusers_to_original({k: v for k, v in tensors.items() if k != "patch_embed.pos_embed"})
    sources = {}
    for name, parts in fused.sources.items():
        name = re.sub(r"^input_block\.", "before_proj.", re.sub(r"^controlnet_blocks\.", "after_proj.", name))
        if graph == DIFFUSERS or not name.startswith(EMBEDDERS):
            sources[name] = parts
    return FusedTensors(fused.tensors, sources)


def _layout(tensors: dict, name: str) -> str:
    """'original' or 'diffusers', or a CheckpointError saying what the file is instead."""
    if any(k.startswith("controlnet.") for k in tensors):
        return "original"
    if "input_block.weight" in tensors and "transformer_blocks.0.ff.conv_inverted.weight" in tensors:
        return "diffusers"
    for fragment, family in OTHER_FAMILIES.items():
        if any(fragment in k for k in tensors):
            raise CheckpointError(f"{name} is a {family} ControlNet ({describe(tensors)}); SANA needs a SANA "
                                  f"ControlNet (e.g. the official HED ControlNet for Sana 0.6B / 1.6B)")
    kind = guess_component(tensors)
    hint = {"transformer": "it is a SANA model without ControlNet weights (no controlnet.* tensors): load it with "
                           "load_transformer (the SANA model loader)",
            "autoencoder": "load it with load_autoencoder (the VAE loader)",
            "text_encoder": "load it with load_text_encoder (the text-encoder loader)",
            "controlnet": "it is a ControlNet of another model family"}.get(kind, "it is no SANA component")
    raise CheckpointError(f"{name} is not a SANA ControlNet: it holds {describe(tensors)}; {hint}",
                          found=kind if kind in ("transformer", "autoencoder", "text_encoder") else None)


def detect_controlnet_config(tensors, settings: dict) -> SanaConfig:
    """The ControlNet's structure from its (our-named) tensors; heads and position embedding from settings."""
    for key in ("x_embedder.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.point_conv.conv.weight",
                "before_proj.weight", "after_proj.0.weight"):
        if key not in tensors:
            raise CheckpointError(f"no {key}: the ControlNet is incomplete ({len(tensors)} tensors)")
    width, in_channels = tensors["x_embedder.proj.weight"].shape[:2]
    self_heads, cross_heads = attention_heads(width, settings, "ControlNet")
    fc1 = tensors.get("y_embedder.y_proj.fc1.weight")
    pe = settings.get("pe_interpolation")
    return SanaConfig(
        depth=1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("blocks.")),
        width=width, caption_dim=SanaConfig.caption_dim if fc1 is None else fc1.shape[1],
        self_heads=self_heads, cross_heads=cross_heads,
        mlp_hidden=tensors["blocks.0.mlp.point_conv.conv.weight"].shape[1],
        qk_norm="blocks.0.attn.q_norm.weight" in tensors, in_channels=in_channels,
        pe_interpolation=None if pe is None else float(pe), base_size=None if pe is None else settings.get("base_size"))


def load_controlnet(path, *, graph=None, dtype=None, device=None, operations=None, **hints) -> ControlNet:
    """Load a SANA ControlNet from an original NVlabs .pth/.safetensors (the whole model with `controlnet.*`:
    only the ControlNet's part is kept, so it drives any base model of its width) or a diffusers
    SanaControlNetModel (folder or single file). graph: None runs the graph the file's layout was trained with
    (original -> "official", diffusers -> "diffusers"); give "official" or "diffusers" for a file whose origin
    you know better. operations: the Linear / Conv2d classes to build with (ComfyUI's comfy.ops; None: torch.nn).
    Hints: cross_heads, self_heads (non-published widths only)."""
    path = Path(path)
    if graph is not None and graph not in GRAPHS:
        raise ValueError(f"graph must be None (from the file's layout), 'official' or 'diffusers', got {graph!r}")
    unknown = sorted(set(hints) - {"cross_heads", "self_heads"})
    if unknown:
        raise TypeError(f"unknown ControlNet hint(s) {', '.join(unknown)}; accepted: cross_heads, self_heads")
    if path.is_dir() and (path / "controlnet").is_dir() and not any(path.glob("*.safetensors")):
        path = path / "controlnet"  # a diffusers pipeline folder
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    tensors, metadata = read_checkpoint(path, weight_names=("diffusion_pytorch_model", "model"))
    tensors = strip_prefix(tensors, PREFIXES)
    layout = _layout(tensors, path.name)
    graph = graph or (OFFICIAL if layout == "original" else DIFFUSERS)
    try:
        if layout == "original":
            tensors = original_to_controlnet(tensors, graph)
        else:
            tensors = diffusers_to_controlnet(tensors, graph)
        settings = {**_parse_config(metadata), **{k: v for k, v in hints.items() if v is not None}}
        config = detect_controlnet_config(tensors, settings)
        if graph == DIFFUSERS and "t_embedder.mlp.0.weight" not in tensors:
            raise CheckpointError("graph='diffusers' needs the ControlNet's own timestep and caption embedders, "
                                  "which this file lacks: run it with graph='official'")
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    log.info("%s: %s-layout ControlNet, %d blocks of width %d, %s graph", path.name, layout, config.depth,
             config.width, graph)
    with torch.device("meta"):
        model = ControlNet(config, graph, dtype=dtype, operations=operations)
    try:
        return load_weights(model, tensors, device=device, dtype=dtype)
    except CheckpointError as e:
        raise CheckpointError(f"{path.name} ({layout}-layout ControlNet, {config.depth} blocks): {e}") from None
