"""Where the nodes run: inside ComfyUI, or outside it (sana-run, tests) with local equivalents.

The node classes never import ComfyUI. They ask `current()` for a host, decided on first use:

    ComfyHost  model folders from folder_paths, devices and dtypes from comfy.model_management,
               models wrapped in comfy.model_patcher.ModelPatcher so that ComfyUI's memory manager
               loads and evicts them, comfy.utils.ProgressBar, the Cancel button.
    LocalHost  model folders under one directory (ComfyUI's layout), the GPU if there is one,
               tqdm progress, models moved with .to().

Both give the same small interface. A loaded model is a `ManagedModel`; `wrap` turns it into what the
MODEL / CLIP / VAE sockets carry: ComfyUI's own objects inside ComfyUI (comfy_family.py), the
ManagedModel itself outside (the stand-in sana-run's nodes take). `unwrap` gives nodes the ManagedModel
back from either.
Each host holds the `Runtime` (sana_core.runtime: CUDA graphs, memory decisions) that the nodes pass
to sana_core.
"""
import copy
import importlib
import logging
import os
import sys
from pathlib import Path

import torch

from sana_core.runtime import Runtime

log = logging.getLogger("sana_nodes")

# The ComfyUI folders each component (and the DiT's LoRAs) is looked up in, in order (the DiT also in checkpoints).
MODEL_FOLDERS = {
    "transformer": ("diffusion_models", "checkpoints"),
    "text_encoder": ("text_encoders",),
    "autoencoder": ("vae",),
    "controlnet": ("controlnet",),
    "lora": ("loras",),
}
# ComfyUI's legacy folder names that still count (models/unet, models/clip).
LEGACY_FOLDERS = {"diffusion_models": ("unet",), "text_encoders": ("clip",)}
MODEL_EXTENSIONS = {".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".bin"}
DIT_EXTENSIONS = MODEL_EXTENSIONS | {".gguf"}  # the DiT may be a GGUF file (sana_core.quantized_files)
GGUF_FOLDER = "unet_gguf"  # ComfyUI: the .gguf files of diffusion_models, as ComfyUI-GGUF registers them
# A folder holding one of these is a model (HF/diffusers layout), listed as one entry.
FOLDER_MARKERS = ("config.json", "model_index.json")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

_host = None


def current():
    """The host the nodes run in: ComfyUI when its modules are importable, else a LocalHost."""
    global _host
    if _host is None:
        try:
            _host = ComfyHost()
        except ImportError:  # not running inside ComfyUI
            _host = LocalHost(os.environ.get("SANA_MODELS_DIR", "models"))
    return _host


def use(host):
    """Make `host` the current one (sana-run and tests); returns it."""
    global _host
    _host = host
    return host


class ModelNotFoundError(FileNotFoundError):
    pass


class ManagedModel:
    """A sana_core model with its file and whatever moves it between devices.

    `model` is the sana_core object (SanaTransformer, TextEncoder, DCAE). Call `ready()` before
    computing: it returns the model on its compute device, asking the host's memory manager for room.
    Inside ComfyUI `patcher` is the comfy.model_patcher.ModelPatcher ComfyUI loads and evicts (for the
    DiT: the MODEL itself, or the patched clone a node was given); outside it is None.
    """

    def __init__(self, host, kind: str, model, path: Path, *, load_device, offload_device, patcher=None):
        self.host, self.kind, self.model, self.path = host, kind, model, Path(path)
        self.load_device, self.offload_device = _exact(load_device), _exact(offload_device)
        self.patcher = patcher
        self.offload_after_use = False  # the text encoder's "gpu, offload after encoding"
        self.loras = ()  # outside ComfyUI, the DiT's LoRAs [(sana_core.lora.Lora, strength)], merged by ready()
        self.workers = None  # the DiT's sana_core.parallel.Workers (SanaModelLoader's gpus), sharing its calls

    @property
    def name(self) -> str:
        return self.path.name

    def ready(self, memory_required: int = 0):
        self.host.load([self], memory_required)
        return self.model

    def release(self):
        """Move the weights to the offload device now (e.g. the text encoder after encoding)."""
        self.host.unload(self)

    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in module_of(self.model).state_dict().values())

    def __repr__(self):
        return f"<{self.kind} {self.name} on {self.load_device}>"


KINDS = {"transformer": ("MODEL", "SanaModelLoader"), "text_encoder": ("CLIP", "SanaTextEncoderLoader"),
         "autoencoder": ("VAE", "SanaVAELoader")}


def unwrap(value, kind: str, where: str) -> ManagedModel:
    """The ManagedModel behind a MODEL / CLIP / VAE input (ComfyUI's object or the stand-in), or an
    error naming the node input. A MODEL keeps its own patcher (a clone carrying LoRA or other patches)."""
    inner = {"transformer": "model", "text_encoder": "cond_stage_model"}.get(kind)
    managed = value if isinstance(value, ManagedModel) else getattr(
        getattr(value, inner) if inner and hasattr(value, inner) else value, "sana", None)
    socket, loader = KINDS[kind]
    if not isinstance(managed, ManagedModel) or managed.kind != kind:
        raise ValueError(f"{where}: this {socket} is not a SANA {socket.lower()} (it was loaded by another model "
                         f"family's loader); load it with {loader}")
    if kind == "transformer" and managed.patcher is not None and value is not managed.patcher:
        managed = copy.copy(managed)
        managed.patcher = value
    return managed


def _exact(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def module_of(model) -> torch.nn.Module:
    """The nn.Module holding the weights a host moves between devices: the model itself, or for a
    TextEncoder its `on_device` part (Gemma less its embedding table, which stays on the CPU)."""
    return model if isinstance(model, torch.nn.Module) else model.on_device


def _weights_moved(model, runtime) -> None:
    """After a host moved a model's weights: drop state derived from their old place: the runtime's cached
    CUDA graphs (they would be re-captured anyway, but hold device memory until then) and the model's own
    caches, if any."""
    runtime.release()
    hook = getattr(model, "clear_device_caches", None)
    if callable(hook):
        hook()


# ---------------------------------------------------------------------------------------------
# Model files: names as ComfyUI lists them (paths relative to a model folder, '/' separated).

def list_names(roots, files=None, extensions=MODEL_EXTENSIONS) -> list[str]:
    """What a loader lists: model files, and model folders (a folder with config.json, e.g. an HF
    Gemma folder or a diffusers component) as one entry instead of their shards. `files`: the
    relative file names ComfyUI already listed (its cached recursive listing), else walked here."""
    names = set()
    for root in map(Path, roots):
        if not root.is_dir():
            continue
        listed = files if files is not None else [
            p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in extensions]
        is_model = {}  # folder -> holds config.json
        for name in listed:
            if not (root / name).is_file():
                continue
            parents = list(Path(name).parents)[:-1]  # the file's folders inside root, nearest first
            flags = [is_model.setdefault(d, (root / d / FOLDER_MARKERS[0]).is_file()) for d in parents]
            if not any(flags):
                names.add(Path(name).as_posix())
            elif flags[0]:
                names.add(parents[0].as_posix())
            # else: deeper inside a model folder (e.g. its original/ copy): part of that model
    return sorted(names)


def find_in(roots, name: str, folders) -> Path:
    """The file or model folder `name` under the first of `roots` that has it."""
    clean = os.path.relpath(os.path.join("/", name), "/")  # no escaping the model folder
    for root in map(Path, roots):
        path = root / clean
        if path.is_file() or (path.is_dir() and any((path / m).exists() for m in FOLDER_MARKERS)):
            return path
    searched = ", ".join(str(r) for r in roots) or "(no folder configured)"
    raise ModelNotFoundError(
        f"model file '{name}' was not found in {' or '.join(folders)} (searched: {searched}). Put the file "
        f"(or Hugging Face/diffusers folder) there, or pick one of the installed models.")


# ---------------------------------------------------------------------------------------------

class LocalHost:
    """Outside ComfyUI: one models directory in ComfyUI's layout, plain torch devices."""

    def __init__(self, models_dir, *, device=None, output_dir="output", input_dir=".", max_vram=None):
        self.models_dir = Path(models_dir)
        self.device = torch.device(device) if device else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        self.output_dir, self.input_dir = Path(output_dir), Path(input_dir)
        self.previews, self.preview_size = False, 512  # a terminal shows no images
        self.runtime = Runtime(max_vram=max_vram)  # max_vram: low VRAM, the runtime places every model
        self.placed = {}  # low VRAM: id(model) -> ManagedModel placed by the runtime

    def roots(self, kind: str) -> list[Path]:
        return [self.models_dir / f for folder in MODEL_FOLDERS[kind]
                for f in (folder,) + LEGACY_FOLDERS.get(folder, ())]

    def list_models(self, kind: str) -> list[str]:
        return list_names(self.roots(kind), extensions=DIT_EXTENSIONS if kind == "transformer" else MODEL_EXTENSIONS)

    def find_model(self, kind: str, name: str) -> Path:
        return find_in(self.roots(kind), name, MODEL_FOLDERS[kind])

    def devices(self, kind: str, placement: str = "gpu") -> tuple[torch.device, torch.device]:
        """(load device, offload device)."""
        cpu = torch.device("cpu")
        return (cpu if placement == "cpu" else self.device), cpu

    def dtype(self, kind: str, choice: str, device) -> torch.dtype:
        if choice in DTYPES:
            return DTYPES[choice]
        from sana_core.checkpoints import default_dtype
        dtype = default_dtype(device)  # bf16 on a GPU that has it, fp32 on the CPU
        return torch.float32 if dtype == torch.float16 and kind == "text_encoder" else dtype

    def operations(self):
        """The DiT's layer classes: torch.nn's."""
        return None

    def manage(self, kind, model, path, load_device, offload_device) -> ManagedModel:
        return ManagedModel(self, kind, model, path, load_device=load_device, offload_device=offload_device)

    def wrap(self, managed: ManagedModel):
        return managed  # the stand-in for MODEL / CLIP / VAE outside ComfyUI

    def core_loop_reason(self, model, *conditionings):
        return None  # no patches outside ComfyUI: SanaSampler's own loop always serves

    def sampler(self, name: str, guidance: float):
        raise RuntimeError("SanaSamplerSelect: a SAMPLER runs in ComfyUI's SamplerCustomAdvanced, which sana-run does "
                           "not stand in for; use SanaSampler outside ComfyUI")

    def pag_patch(self, model: ManagedModel, scale: float, layers: tuple) -> ManagedModel:
        """The stand-in MODEL with the SANA PAG patch, as SanaSampler reads it (sampling.model_patch_settings)."""
        patched = copy.copy(model)
        patched.model_options = {"transformer_options": {"sana_pag": {"scale": scale, "layers": layers}}}
        return patched

    def lora_patch(self, model: ManagedModel, name: str, tensors: dict, metadata: dict, strength: float) -> ManagedModel:
        """The stand-in MODEL with one more LoRA, merged into the DiT's weights when it computes (load)."""
        from sana_core.lora import read_lora
        patched = copy.copy(model)
        patched.loras = model.loras + ((read_lora(name, model.model, tensors=tensors, metadata=metadata), strength),)
        return patched

    def load(self, models, memory_required: int = 0) -> None:
        from sana_core.lora import loras_merged, set_loras
        if self.runtime.max_vram is not None:  # low VRAM: the runtime places each model
            for other in list(self.placed.values()):  # Gemma is offloaded once another model needs the GPU
                if other.kind == "text_encoder" and all(other.model is not m.model for m in models):
                    self.unload(other)
            for m in models:  # (a decode tiles to fit: it reserves nothing)
                if m.kind == "transformer" and not loras_merged(m.model, m.loras):
                    self.runtime.offload(m.model)  # LoRAs merge into the weights' CPU copies
                    set_loras(m.model, m.loras)
                self.runtime.place(m.model, m.load_device, reserve=0 if m.kind == "autoencoder" else memory_required)
                self.placed[id(m.model)] = m
            return
        for m in models:
            module = module_of(m.model)
            first = next(iter(module.parameters()), None)
            if first is not None and first.device != m.load_device:
                module.to(m.load_device)
                _weights_moved(m.model, self.runtime)
            if m.kind == "transformer":  # this MODEL's LoRAs, in place: captured graphs stay valid
                set_loras(m.model, m.loras)

    def unload(self, m: ManagedModel) -> None:
        if self.placed.pop(id(m.model), None) is not None:
            self.runtime.offload(m.model)
            return
        module_of(m.model).to(m.offload_device)
        _weights_moved(m.model, self.runtime)

    def intermediate_device(self) -> torch.device:
        return torch.device("cpu")

    def progress(self, total: int, desc: str = ""):
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)

        def update(step, total_, preview=None):
            bar.total = total_
            bar.n = step
            bar.refresh()
            if step >= total_:
                bar.close()
        return update

    def check_interrupted(self) -> None:
        pass

    def free_cache(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class WarningsOnNode(logging.Handler):
    """sana_core's warnings (a prompt too long, ...) as progress text on the node that is running, where the
    person who queued it sees them (ComfyUI's frontend shows a node's progress text under it)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.executing = importlib.import_module("comfy_execution.utils").get_executing_context

    def emit(self, record):
        prompt_server = getattr(sys.modules.get("server"), "PromptServer", None)  # a running server's, if any
        executing, server = self.executing(), getattr(prompt_server, "instance", None)
        if executing is not None and server is not None:
            server.send_progress_text(record.getMessage(), executing.node_id)


class ComfyHost:
    """Inside ComfyUI: folder_paths, comfy.model_management, ModelPatcher, ProgressBar."""
    previews = True  # live previews on the sampler node

    def __init__(self):
        # ComfyUI's modules, imported here only (never at module level): ImportError outside ComfyUI.
        self.mm = importlib.import_module("comfy.model_management")
        self.folder_paths = importlib.import_module("folder_paths")
        self.args = importlib.import_module("comfy.cli_args").args
        self.model_patcher = importlib.import_module("comfy.model_patcher")
        self.callbacks = importlib.import_module("comfy.patcher_extension").CallbacksMP
        self.utils = importlib.import_module("comfy.utils")
        self.runtime = Runtime()
        library = logging.getLogger("sana_core")  # its warnings shown on the running node, not only in the log
        library.handlers = [h for h in library.handlers if not isinstance(h, WarningsOnNode)] + [WarningsOnNode()]
        self.family = importlib.import_module(__package__ + ".comfy_family")
        folders = self.folder_paths.folder_names_and_paths
        if GGUF_FOLDER not in folders and "diffusion_models" in folders:  # the same paths (list), .gguf files only
            folders[GGUF_FOLDER] = (folders["diffusion_models"][0], {".gguf"})

    def roots(self, kind: str) -> list[Path]:
        return [Path(p) for folder in MODEL_FOLDERS[kind] for p in self._folder_paths(folder)]

    def _folder_paths(self, folder):
        try:
            return self.folder_paths.get_folder_paths(folder)
        except KeyError:
            return []

    def list_models(self, kind: str) -> list[str]:
        names = set()
        for folder in MODEL_FOLDERS[kind]:
            roots = self._folder_paths(folder)
            if roots:  # ComfyUI's cached recursive listing, minus the insides of model folders
                names.update(list_names(roots, self.folder_paths.get_filename_list(folder)))
        if kind == "transformer" and self._folder_paths(GGUF_FOLDER):
            names.update(list_names(self._folder_paths(GGUF_FOLDER), self.folder_paths.get_filename_list(GGUF_FOLDER)))
        return sorted(names)

    def find_model(self, kind: str, name: str) -> Path:
        return find_in(self.roots(kind), name, MODEL_FOLDERS[kind])

    def devices(self, kind: str, placement: str = "gpu") -> tuple[torch.device, torch.device]:
        mm, cpu = self.mm, torch.device("cpu")
        if kind == "transformer":
            return mm.get_torch_device(), mm.unet_offload_device()
        if kind == "autoencoder":
            return mm.vae_device(), mm.vae_offload_device()
        if placement == "cpu":
            return cpu, cpu
        load = mm.text_encoder_device() if placement == "auto" else mm.get_torch_device()  # or "gpu"
        return load, mm.text_encoder_offload_device()

    def dtype(self, kind: str, choice: str, device) -> torch.dtype:
        if choice in DTYPES:
            return DTYPES[choice]
        mm, args = self.mm, self.args
        if kind == "transformer":  # honours --bf16-unet / --fp32-unet ...; never fp8 compute here
            dtype = mm.unet_dtype(device, supported_dtypes=[torch.bfloat16, torch.float16, torch.float32])
            return dtype if dtype in DTYPES.values() else torch.bfloat16
        if kind == "autoencoder":
            return mm.vae_dtype(device, [torch.bfloat16, torch.float32])
        for flag, dtype in (("fp32_text_enc", torch.float32), ("bf16_text_enc", torch.bfloat16),
                            ("fp16_text_enc", torch.float16)):
            if getattr(args, flag, False):
                return dtype
        # ComfyUI defaults text encoders to fp16, which Gemma-2 overflows: bf16 or fp32
        return torch.bfloat16 if mm.should_use_bf16(device, prioritize_performance=False) else torch.float32

    def manage(self, kind, model, path, load_device, offload_device) -> ManagedModel:
        CallbacksMP = self.callbacks
        managed = ManagedModel(self, kind, model, path, load_device=load_device, offload_device=offload_device)
        if kind == "transformer":
            patcher = self.family.model_patcher(managed)
            model = patcher.model.diffusion_model  # its clear_device_caches covers the DiT's and the captions'
        else:
            holder = SanaWeights(module_of(model), offload_device)
            patcher = self.model_patcher.ModelPatcher(holder, load_device=load_device, offload_device=offload_device)
        # ComfyUI may evict and reload the weights between (or within) prompts: whatever was
        # derived from their old place (captured graphs, cached tensors) must go.
        patcher.add_callback(CallbacksMP.ON_LOAD, lambda *_: _weights_moved(model, self.runtime))
        patcher.add_callback(CallbacksMP.ON_DETACH, lambda *_: _weights_moved(model, self.runtime))
        managed.patcher = patcher
        return managed

    def core_loop_reason(self, model, *conditionings):
        return self.family.core_loop_reason(model, *conditionings)

    def sampler(self, name: str, guidance: float):
        return self.family.sampler(name, guidance)

    def pag_patch(self, model, scale: float, layers: tuple):
        return self.family.pag_patch(model, scale, layers)

    def lora_patch(self, model, name: str, tensors: dict, metadata: dict, strength: float):
        """A clone of the MODEL (ModelPatcher) with the LoRA's weight patches (nodes/lora.py)."""
        from .lora import lora_patches
        patched = model.clone()
        patched.add_patches(lora_patches(name, tensors, metadata, model.model.diffusion_model.transformer), strength)
        return patched

    def wrap(self, managed: ManagedModel):
        """MODEL: the ModelPatcher; CLIP: a comfy.sd.CLIP; VAE: a comfy.sd.VAE (comfy_family.py)."""
        if managed.kind == "transformer":
            return managed.patcher
        return (self.family.clip if managed.kind == "text_encoder" else self.family.SanaVAE)(managed)

    def operations(self):
        """The DiT's layer classes: ComfyUI's, which cast the weights that low-VRAM loading leaves on the CPU
        and apply weight patches on the fly (sana_core.operations)."""
        return importlib.import_module("comfy.ops").disable_weight_init

    def load(self, models, memory_required: int = 0) -> None:
        # The DiT (built from comfy.ops) may be loaded partially (low VRAM); the text encoder and the DC-AE have
        # no such layers, so they load whole: ComfyUI evicts other models to make room instead.
        # The cached CUDA graphs' pool is reserved memory that ComfyUI counts as free (reserved minus
        # active) but only graph replays can use: ask for that much more.
        held = self.runtime.held_bytes(models[0].load_device) if models else 0
        self.mm.load_models_gpu([m.patcher for m in models], memory_required=memory_required + held,
                                force_full_load=any(m.kind != "transformer" for m in models))

    def unload(self, m: ManagedModel) -> None:
        for i, loaded in enumerate(self.mm.current_loaded_models):
            if loaded.model is m.patcher:
                self.mm.current_loaded_models.pop(i).model_unload()
                break
        self.mm.soft_empty_cache()

    def intermediate_device(self) -> torch.device:
        return self.mm.intermediate_device()

    def progress(self, total: int, desc: str = ""):
        bar = self.utils.ProgressBar(total)

        def update(step, total_, preview=None):
            bar.update_absolute(step, total_, preview)
        return update

    def check_interrupted(self) -> None:
        self.mm.throw_exception_if_processing_interrupted()

    def free_cache(self) -> None:
        self.mm.soft_empty_cache()

    @property
    def preview_size(self) -> int:
        return self.args.preview_size


class SanaWeights(torch.nn.Module):
    """The nn.Module a ModelPatcher moves: the sana_core model's weights under `weights`.
    ModelPatcher keeps its bookkeeping (device, loaded memory) as attributes on this module,
    not on the sana_core object."""

    def __init__(self, weights: torch.nn.Module, device):
        super().__init__()
        self.weights = weights
        self.device = torch.device(device)
