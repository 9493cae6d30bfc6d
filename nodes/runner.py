"""sana-run: run a ComfyUI workflow (API or UI form) with the SANA nodes, in-process, without ComfyUI.

    sana-run WORKFLOW.json --models DIR [--set NODE.INPUT=VALUE ...] [--output DIR] [--input DIR]
    sana-run --write-demo-models DIR            # tiny random-weight models, real formats
    sana-run WORKFLOW.json --models DIR --demo  # ...and use them in place of the workflow's models
    sana-run WORKFLOW.json --to-api             # print the API form of a UI workflow

Besides the SANA nodes it stands in for ComfyUI's core CLIPTextEncode, VAEDecode, VAEDecodeTiled,
VAEEncode, SetLatentNoiseMask, ImagePadForOutpaint, SaveImage, PreviewImage and LoadImage (same inputs; they
take the SANA models): PNGs carry the workflow in their "prompt" (API form) and "workflow" (UI form, when
given) text chunks, so they open in ComfyUI. Other core nodes (KSampler, SamplerCustomAdvanced, ModelSamplingSD3 ...) run in ComfyUI only.
NODE in --set is a node id, a node title or a node type that occurs once.
"""
import argparse
import inspect
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, host
from .conditioning import encode_text
from .vae import decode, encode

PRIMITIVE_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
VIRTUAL_NODES = ("Note", "MarkdownNote")  # UI-only, never executed
MODE_MUTED, MODE_BYPASSED = 2, 4
# Files sana_core.demo.write_demo_models writes, by the loader that takes them.
DEMO_MODELS = {
    "SanaModelLoader": ("model_name", "sana_demo.safetensors"),
    "SanaTextEncoderLoader": ("text_encoder_name", "gemma2_demo.safetensors"),
    "SanaVAELoader": ("vae_name", "sana_demo_dcae.safetensors"),
    "SanaControlNetLoader": ("control_net_name", "sana_demo_controlnet.safetensors"),
    "SanaLoraLoader": ("lora_name", "sana_demo_lora.safetensors"),
}
DEMO_SPRINT = "sana_sprint_demo.safetensors"


class WorkflowError(Exception):
    """A workflow that cannot run; the message says which node and what to change."""


# ---------------------------------------------------------------------------------------------
# ComfyUI's core image nodes, with ComfyUI's inputs, for running outside ComfyUI.

def _png_info(prompt, extra_pnginfo):
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        info.add_text(key, json.dumps(value))
    return info


class SaveImage:
    subfolder, type, compress_level = "", "output", 4

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The images to save."}),
            "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": "The prefix for the file to save."}),
        }, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"
    DESCRIPTION = "Saves the input images to the output directory."

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        from PIL import Image
        folder = Path(host.current().output_dir) / self.subfolder / Path(filename_prefix).parent
        folder.mkdir(parents=True, exist_ok=True)
        name = Path(filename_prefix).name
        taken = [int(p.name[len(name) + 1:].split("_")[0]) for p in folder.glob(f"{name}_*_.png")
                 if p.name[len(name) + 1:].split("_")[0].isdigit()]
        counter = max(taken, default=0) + 1
        results = []
        for image in images:
            pixels = np.clip(255.0 * image.cpu().float().numpy(), 0, 255).astype(np.uint8)
            path = folder / f"{name}_{counter:05}_.png"
            Image.fromarray(pixels).save(path, pnginfo=_png_info(prompt, extra_pnginfo),
                                         compress_level=self.compress_level)
            results.append({"filename": path.name, "subfolder": str(path.parent), "type": self.type})
            counter += 1
        return {"ui": {"images": results}}


class PreviewImage(SaveImage):
    subfolder, type, compress_level = "temp", "temp", 1

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    DESCRIPTION = "Saves the input images to a temp folder under the output directory."

    def save_images(self, images, filename_prefix="ComfyUI_temp", prompt=None, extra_pnginfo=None):
        return super().save_images(images, filename_prefix, prompt, extra_pnginfo)


class LoadImage:
    @classmethod
    def INPUT_TYPES(cls):
        folder = Path(host.current().input_dir)
        files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")) \
            if folder.is_dir() else []
        return {"required": {"image": (files, {"image_upload": True})}}

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    CATEGORY = "image"

    def load_image(self, image):
        from PIL import Image, ImageOps
        path = Path(host.current().input_dir) / image
        if not path.is_file():
            raise FileNotFoundError(f"image '{image}' was not found in {host.current().input_dir} (give --input DIR, or "
                                    f"an absolute path with --set LoadImage.image=PATH)")
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            pixels = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]
            if "A" in img.getbands():
                mask = 1.0 - torch.from_numpy(np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0)
            else:
                mask = torch.zeros((64, 64), dtype=torch.float32)
        return (pixels, mask[None])


class CLIPTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True, "dynamicPrompts": True}), "clip": ("CLIP",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "conditioning"

    def encode(self, clip, text):  # SANA's recipe, as the CLIP of SanaTextEncoderLoader in ComfyUI
        emb, mask = encode_text(host.unwrap(clip, "text_encoder", "CLIPTextEncode"), text, bool(text.strip()))
        return ([[emb, {"attention_mask": mask}]],)


class VAEDecode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = "latent"

    def decode(self, vae, samples):
        return (decode(host.unwrap(vae, "autoencoder", "VAEDecode"), samples, "VAEDecode"),)


class VAEDecodeTiled:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",),
                             "tile_size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 32}),
                             "overlap": ("INT", {"default": 64, "min": 0, "max": 4096, "step": 32}),
                             "temporal_size": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 4}),
                             "temporal_overlap": ("INT", {"default": 8, "min": 4, "max": 4096, "step": 4})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = "_for_testing"

    def decode(self, vae, samples, tile_size, overlap=64, temporal_size=64, temporal_overlap=8):
        managed = host.unwrap(vae, "autoencoder", "VAEDecodeTiled")
        decoder = managed.model.decoder  # overlap raised to the exact context, as the SANA VAE does in ComfyUI
        return (decode(managed, samples, "VAEDecodeTiled", tile=tile_size,
                       overlap=max(overlap, decoder.local_halo * decoder.local_scale)),)


class VAEEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = "latent"

    def encode(self, vae, pixels):
        return ({"samples": encode(host.unwrap(vae, "autoencoder", "VAEEncode"), pixels, "VAEEncode")},)


class SetLatentNoiseMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "mask": ("MASK",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "set_mask"
    CATEGORY = "latent/inpaint"

    def set_mask(self, samples, mask):
        return ({**samples, "noise_mask": mask.reshape(-1, 1, *mask.shape[-2:])},)


class ImagePadForOutpaint:
    @classmethod
    def INPUT_TYPES(cls):
        side = {"default": 0, "min": 0, "max": 16384, "step": 8}
        return {"required": {"image": ("IMAGE",), "left": ("INT", side), "top": ("INT", side),
                             "right": ("INT", side), "bottom": ("INT", side),
                             "feathering": ("INT", {"default": 40, "min": 0, "max": 16384, "step": 1})}}

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "expand_image"
    CATEGORY = "image"

    def expand_image(self, image, left, top, right, bottom, feathering):
        """The image on a grey canvas grown by the given sides; the mask is 1 on the new band and, inside the
        image, ((feathering - d) / feathering)^2 within `feathering` pixels of a grown side (d: the distance
        to it; top and left count from 0, bottom and right from 1), as ComfyUI's node makes it."""
        B, H, W, C = image.shape
        out = torch.full((B, H + top + bottom, W + left + right, C), 0.5)
        out[:, top:top + H, left:left + W] = image
        mask = torch.ones(H + top + bottom, W + left + right)
        rows, cols = torch.arange(H, dtype=torch.float64)[:, None], torch.arange(W, dtype=torch.float64)[None]
        d = torch.full((H, W), float("inf"), dtype=torch.float64)
        for grown, distance in ((top, rows), (bottom, H - rows), (left, cols), (right, W - cols)):
            if grown:
                d = torch.minimum(d, distance.expand(H, W))
        inside = torch.zeros(H, W, dtype=torch.float64)
        if 0 < feathering and 2 * feathering < min(H, W):
            inside = torch.where(d < feathering, ((feathering - d) / feathering) ** 2, inside)  # in float64
        mask[top:top + H, left:left + W] = inside
        return (out, mask[None])


CORE_NODES = {"SaveImage": SaveImage, "PreviewImage": PreviewImage, "LoadImage": LoadImage,
              "CLIPTextEncode": CLIPTextEncode, "VAEDecode": VAEDecode, "VAEDecodeTiled": VAEDecodeTiled,
              "VAEEncode": VAEEncode, "SetLatentNoiseMask": SetLatentNoiseMask,
              "ImagePadForOutpaint": ImagePadForOutpaint}
DISPLAY_NAMES = {**NODE_DISPLAY_NAME_MAPPINGS, "SaveImage": "Save Image", "PreviewImage": "Preview Image",
                 "LoadImage": "Load Image", "CLIPTextEncode": "CLIP Text Encode (Prompt)", "VAEDecode": "VAE Decode",
                 "VAEDecodeTiled": "VAE Decode (Tiled)", "VAEEncode": "VAE Encode",
                 "ControlNetApplyAdvanced": "Apply ControlNet", "SetLatentNoiseMask": "Set Latent Noise Mask",
                 "ImagePadForOutpaint": "Pad Image for Outpainting"}
# ComfyUI core nodes of shipped workflows that sana-run does not run: their inputs in ComfyUI's order, so that
# those workflows translate to the API form (ui_to_api, --to-api); running one names it (validate).
COMFY_ONLY_INPUTS = {
    "KSampler": {"model": "MODEL", "seed": "INT", "steps": "INT", "cfg": "FLOAT", "sampler_name": "COMBO",
                 "scheduler": "COMBO", "positive": "CONDITIONING", "negative": "CONDITIONING",
                 "latent_image": "LATENT", "denoise": "FLOAT"},
    "Canny": {"image": "IMAGE", "low_threshold": "FLOAT", "high_threshold": "FLOAT"},
    "ControlNetApplyAdvanced": {"positive": "CONDITIONING", "negative": "CONDITIONING", "control_net": "CONTROL_NET",
                                "image": "IMAGE", "strength": "FLOAT", "start_percent": "FLOAT",
                                "end_percent": "FLOAT", "vae": "VAE"},
}


def node_classes() -> dict:
    return {**NODE_CLASS_MAPPINGS, **CORE_NODES}


def translatable_classes() -> dict:
    """node_classes() and the input lists of COMFY_ONLY_INPUTS' nodes."""
    comfy_only = {name: type(name, (), {"INPUT_TYPES": classmethod(
        lambda cls, inputs=inputs: {"required": {n: (k, {}) for n, k in inputs.items()}})})
        for name, inputs in COMFY_ONLY_INPUTS.items()}
    return {**node_classes(), **comfy_only}


# ---------------------------------------------------------------------------------------------
# Workflow forms.

def input_specs(cls) -> dict:
    """name -> (type, options) of a node class's required and optional inputs, in widget order."""
    types = cls.INPUT_TYPES()
    specs = {}
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            specs[name] = (spec[0], spec[1] if len(spec) > 1 else {})
    return specs


def is_widget(kind) -> bool:
    """Inputs shown as widgets (values in the node), as opposed to sockets (links)."""
    return isinstance(kind, (list, tuple)) or kind in PRIMITIVE_TYPES


def widget_slots(name: str, kind, options: dict) -> int:
    """How many entries of a UI node's widgets_values an input takes: the frontend adds a
    "control after generate" value after seeds and an upload button value after image combos."""
    if kind == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed")):
        return 2
    if options.get("image_upload"):
        return 2
    return 1


def ui_to_api(workflow: dict, classes: dict | None = None) -> dict:
    """A UI-form workflow (what the editor saves: nodes, links, positional widgets_values) as the
    API form ComfyUI's /prompt takes: {id: {"class_type", "inputs", "_meta": {"title"}}}."""
    classes = classes or translatable_classes()
    nodes = {str(n["id"]): n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow.get("links", [])}  # id, from, from_slot, to, to_slot, type

    def source(link_id):
        _, origin, slot, *_ = links[link_id]
        node = nodes[str(origin)]
        if node.get("mode", 0) == MODE_BYPASSED or node["type"] == "Reroute":
            # pass-through: the bypassed node's input of the same type (or the reroute's only input)
            kind = links[link_id][5]
            for inp in node.get("inputs", []):
                if inp.get("link") is not None and (node["type"] == "Reroute" or inp.get("type") == kind):
                    return source(inp["link"])
            raise WorkflowError(f"node {origin} ({node['type']}) is bypassed and has no {kind} input to pass on")
        return [str(origin), slot]

    prompt = {}
    for node_id, node in nodes.items():
        if node["type"] in VIRTUAL_NODES + ("Reroute",) or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASSED):
            continue
        if node["type"] not in classes:
            raise WorkflowError(f"node {node_id} has type '{node['type']}', which is not available here "
                                f"(available: {', '.join(sorted(classes))})")
        linked = {inp["name"]: inp["link"] for inp in node.get("inputs", []) if inp.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, (kind, options) in input_specs(classes[node["type"]]).items():
            if is_widget(kind) and not options.get("forceInput"):
                taken, values = values[:widget_slots(name, kind, options)], values[widget_slots(name, kind, options):]
                if taken:
                    inputs[name] = taken[0]
            if name in linked:
                inputs[name] = source(linked[name])
        prompt[node_id] = {"class_type": node["type"], "inputs": inputs,
                           "_meta": {"title": node.get("title") or DISPLAY_NAMES.get(node["type"], node["type"])}}
    return prompt


def load_workflow(path) -> tuple[dict, dict | None]:
    """(API-form prompt, UI-form workflow or None) from a workflow file of either form."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WorkflowError(f"workflow file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{path} is not JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data:
        return ui_to_api(data), data
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):  # a /prompt request body
        data = data["prompt"]
    if not isinstance(data, dict) or not all(isinstance(n, dict) and "class_type" in n for n in data.values()):
        raise WorkflowError(f"{path} is neither a UI workflow (nodes, links) nor an API workflow "
                            f"({{id: {{class_type, inputs}}}})")
    return data, None


def find_node(prompt: dict, ref: str) -> str:
    """A node id from an id, a title, or a node type that occurs once."""
    if ref in prompt:
        return ref
    for key in ("title", "class_type"):
        hits = [i for i, n in prompt.items() if (n.get("_meta", {}).get("title") if key == "title" else n[key]) == ref]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise WorkflowError(f"--set: '{ref}' names {len(hits)} nodes ({', '.join(hits)}); use the node id")
    raise WorkflowError(f"--set: no node '{ref}' (ids: {', '.join(prompt)}; types: "
                        f"{', '.join(sorted({n['class_type'] for n in prompt.values()}))})")


def parse_value(text: str, kind, name: str):
    try:
        if kind == "INT":
            return int(text)
        if kind == "FLOAT":
            return float(text)
    except ValueError:
        raise WorkflowError(f"--set: {name} takes {'a whole number' if kind == 'INT' else 'a number'}, "
                            f"not {text!r}") from None
    if kind == "BOOLEAN":
        if text.lower() not in ("true", "false", "1", "0", "on", "off", "yes", "no"):
            raise WorkflowError(f"--set: {name} takes true or false, not {text!r}")
        return text.lower() in ("true", "1", "on", "yes")
    return text


def apply_sets(prompt: dict, assignments, classes: dict | None = None) -> dict:
    """Apply NODE.INPUT=VALUE assignments (values typed by the input's kind)."""
    classes = classes or node_classes()
    for assignment in assignments:
        target, eq, text = assignment.partition("=")
        ref, dot, name = target.rpartition(".")
        if not eq or not dot:
            raise WorkflowError(f"--set {assignment!r}: expected NODE.INPUT=VALUE, e.g. SanaSampler.steps=2")
        node_id = find_node(prompt, ref)
        cls = classes.get(prompt[node_id]["class_type"])
        specs = input_specs(cls) if cls else {}
        if name not in specs:
            raise WorkflowError(f"--set: node {node_id} ({prompt[node_id]['class_type']}) has no input '{name}' "
                                f"(inputs: {', '.join(specs)})")
        prompt[node_id]["inputs"][name] = parse_value(text, specs[name][0], f"{ref}.{name}")
    return prompt


def use_demo_models(prompt: dict) -> dict:
    """Point every SANA loader at the demo model files (sana_core.demo.write_demo_models)."""
    for node in prompt.values():
        if node["class_type"] in DEMO_MODELS:
            name, demo = DEMO_MODELS[node["class_type"]]
            if node["class_type"] == "SanaModelLoader" and "sprint" in str(node["inputs"].get(name, "")).lower():
                demo = DEMO_SPRINT
            node["inputs"][name] = demo
    return prompt


# ---------------------------------------------------------------------------------------------
# Execution.

def is_link(value) -> bool:
    """An API-form input that is [source node id, output index] rather than a value."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def _describe(prompt, node_id):
    return f"node {node_id} ({prompt[node_id]['class_type']})"


def validate(prompt: dict, classes: dict) -> list[str]:
    """Check types, links and inputs; return the ids of the nodes to run, in dependency order."""
    for node_id, node in prompt.items():
        if node["class_type"] not in classes:
            raise WorkflowError(f"{_describe(prompt, node_id)}: sana-run cannot stand in for this node; it runs the "
                                f"SANA nodes and ComfyUI's {', '.join(CORE_NODES)} (run this workflow in ComfyUI, or "
                                f"use SanaSampler for KSampler)")
    outputs = [i for i, n in prompt.items() if getattr(classes[n["class_type"]], "OUTPUT_NODE", False)]
    if not outputs:
        raise WorkflowError("the workflow has no output node (SaveImage or PreviewImage): nothing would be saved")
    order, state = [], {}

    def visit(node_id, path):
        if state.get(node_id) == "done":
            return
        if state.get(node_id) == "visiting":
            raise WorkflowError(f"the workflow has a cycle: {' -> '.join(path + [node_id])}")
        state[node_id] = "visiting"
        node, cls = prompt[node_id], classes[prompt[node_id]["class_type"]]
        types = cls.INPUT_TYPES()
        custom_checks = inspect.signature(cls.VALIDATE_INPUTS).parameters if hasattr(cls, "VALIDATE_INPUTS") else {}
        for name, (kind, options) in input_specs(cls).items():
            value = node.get("inputs", {}).get(name)
            if value is None:
                if name in types.get("required", {}):
                    raise WorkflowError(f"{_describe(prompt, node_id)} is missing its required input '{name}' ({kind})")
                continue
            if is_link(value):
                origin, slot = str(value[0]), value[1]
                if origin not in prompt:
                    raise WorkflowError(f"{_describe(prompt, node_id)}: input '{name}' links to node {origin}, "
                                        f"which is not in the workflow")
                produced = classes[prompt[origin]["class_type"]].RETURN_TYPES
                if not 0 <= slot < len(produced):
                    raise WorkflowError(f"{_describe(prompt, node_id)}: input '{name}' links to output {slot} of "
                                        f"{_describe(prompt, origin)}, which has {len(produced)} outputs")
                expected = "COMBO" if isinstance(kind, (list, tuple)) else kind
                if produced[slot] != expected and "*" not in (produced[slot], expected):
                    raise WorkflowError(f"{_describe(prompt, node_id)}: input '{name}' takes {expected} but is linked "
                                        f"to a {produced[slot]} output of {_describe(prompt, origin)}")
                visit(origin, path + [node_id])
            elif name in custom_checks:  # the node's own check (the loaders: is the model file there?)
                answer = getattr(cls, "VALIDATE_INPUTS")(**{name: value})
                if answer is not True:
                    raise WorkflowError(f"{_describe(prompt, node_id)}: {answer}")
            elif isinstance(kind, (list, tuple)) and value not in kind:
                shown = ", ".join(map(str, kind[:12])) + (" ..." if len(kind) > 12 else "")
                raise WorkflowError(f"{_describe(prompt, node_id)}: '{name}' is {value!r}, not one of: {shown or '(none)'}")
        state[node_id] = "done"
        order.append(node_id)

    for node_id in outputs:
        visit(node_id, [])
    return order


def execute(prompt: dict, *, ui_workflow: dict | None = None, classes: dict | None = None, log=print) -> dict:
    """Run the workflow; returns {node_id: ui output} of the nodes that sent one."""
    classes = classes or node_classes()
    order = validate(prompt, classes)
    results, ui = {}, {}
    for index, node_id in enumerate(order, 1):
        node, cls = prompt[node_id], classes[prompt[node_id]["class_type"]]
        kwargs = {}
        for name, value in node.get("inputs", {}).items():
            if is_link(value):
                value = results[str(value[0])][value[1]]
            kwargs[name] = value
        for name, kind in cls.INPUT_TYPES().get("hidden", {}).items():
            kwargs[name] = {"PROMPT": prompt, "EXTRA_PNGINFO": {"workflow": ui_workflow} if ui_workflow else None,
                            "UNIQUE_ID": node_id}.get(kind)
        log(f"[{index}/{len(order)}] {node_id} {node['class_type']}")
        started = time.perf_counter()
        try:
            out = getattr(cls(), cls.FUNCTION)(**kwargs)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            raise WorkflowError(f"{_describe(prompt, node_id)} failed: {e}") from e
        if isinstance(out, dict):
            if out.get("ui"):
                ui[node_id] = out["ui"]
            out = out.get("result", ())
        results[node_id] = tuple(out or ())
        if time.perf_counter() - started > 1.0:
            log(f"      {time.perf_counter() - started:.1f} s")
    return ui


def main(argv=None, worker=None) -> int:
    """worker: (rank, port of process 0) in the processes --devices spawns."""
    parser = argparse.ArgumentParser(prog="sana-run", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example: sana-run workflows/api/sana_1024_text_to_image.json --models "
                                            "~/ComfyUI/models --set 'SanaTextEncode.text=a red fox in the snow'")
    parser.add_argument("workflow", nargs="?", help="workflow JSON, API form (Export (API)) or UI form (Save)")
    parser.add_argument("--models", default=os.environ.get("SANA_MODELS_DIR", "models"),
                        help="model folder in ComfyUI's layout: diffusion_models/ (or checkpoints/), "
                             "text_encoders/, vae/, loras/ (default: ./models or $SANA_MODELS_DIR)")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="change an input: NODE is a node id, title or type (e.g. SanaSampler.seed=7)")
    parser.add_argument("--output", default="output", help="folder for the images (default: ./output)")
    parser.add_argument("--input", default=".", help="folder LoadImage reads from (default: .)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    parser.add_argument("--max-vram", metavar="GIB", type=float,
                        help="low VRAM: the GPU memory to use, in GiB (e.g. 7 on an 8 GB card): models wait in CPU "
                             "memory, the DiT streams its blocks when it does not fit, Gemma leaves after encoding, "
                             "the decode tiles")
    parser.add_argument("--devices", metavar="0,1",
                        help="one image on several GPUs (one process each; 'cpu,cpu': CPU processes)")
    parser.add_argument("--demo", action="store_true",
                        help="use the tiny demo models (from --write-demo-models) in place of the workflow's "
                             "model files: runs anywhere, makes noise images")
    parser.add_argument("--to-api", action="store_true",
                        help="print the workflow in API form (what ComfyUI's Export (API) writes) and exit")
    parser.add_argument("--write-demo-models", metavar="DIR",
                        help="write tiny random-weight SANA models in the real file formats to DIR and exit "
                             "(unless a workflow is given too)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if worker is None else logging.WARNING, format="%(message)s")
    say = (lambda msg: print(msg, file=sys.stderr)) if worker is None else (lambda msg: None)  # noqa: E731
    if not args.workflow and not args.write_demo_models:
        parser.error("give a workflow file, or --write-demo-models DIR")
    if args.max_vram is not None and (args.devices or args.cpu):
        parser.error("--max-vram caps one GPU's memory: leave out --devices and --cpu")
    if args.max_vram is not None and not torch.cuda.is_available():
        parser.error("--max-vram caps GPU memory, but no CUDA GPU is available here: leave it out")
    try:
        if args.write_demo_models:
            from sana_core.demo import write_demo_models
            for kind, path in (write_demo_models(args.write_demo_models) if worker is None else {}).items():
                say(f"wrote {kind}: {path}")  # (--devices workers read what process 0 wrote)
            if not args.workflow:
                return 0
            args.models = args.write_demo_models
        if args.devices:
            from .parallel_host import parallel_host
            host.use(parallel_host(args.devices, sys.argv[1:] if argv is None else argv, worker,
                                   models_dir=args.models, output_dir=args.output, input_dir=args.input))
        else:
            host.use(host.LocalHost(args.models, device="cpu" if args.cpu else None, output_dir=args.output,
                                    input_dir=args.input, max_vram=args.max_vram))
        prompt, ui_workflow = load_workflow(args.workflow)
        if args.to_api:
            print(json.dumps(prompt, indent=2))
            return 0
        if args.demo:
            use_demo_models(prompt)
        apply_sets(prompt, args.set)
        ui = execute(prompt, ui_workflow=ui_workflow, log=say)
        if args.devices:
            host.current().close()
    except WorkflowError as e:
        say(f"sana-run: error: {e}")
        return 1
    except KeyboardInterrupt:
        say("sana-run: interrupted")
        return 130
    if worker is not None:
        return 0
    for node_id, out in ui.items():
        for image in out.get("images", []):
            print(Path(image["subfolder"]) / image["filename"])
        for stats in out.get("sana_stats", []):
            say(f"node {node_id}: {stats['steps']} steps, {stats['seconds_per_step']:.3f} s/step, "
                f"{stats['total_seconds']:.2f} s total"
                + (f", peak GPU memory {stats['peak_gpu_memory_gib']:.2f} GiB" if stats["peak_gpu_memory_gib"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
