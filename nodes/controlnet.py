"""SANA ControlNets as ComfyUI's CONTROL_NET, for the core Apply ControlNet nodes.

The loader returns a `comfy.controlnet.ControlBase`, so Apply ControlNet sets its hint image, strength,
start/end percent and VAE, and chains several. Per model call ComfyUI asks it get_control; ours computes
nothing (the official graph needs base block 0's output, which exists only inside the DiT's forward) but
returns what the SANA model wrapper (comfy_family.SanaDiffusionModel) hands the DiT:

    {"sana_controls": [(ControlNet, hint latent (B, 32, h, w), strength), ...]}   # this one and the previous ones

Outside its start/end window a ControlNet returns only the previous ones' entry, or None: the model then runs
its plain path (bit for bit). The hint image is resized to the image size, encoded by the VAE given to Apply
ControlNet and scaled by SANA's latent format (raw DC-AE latent x 0.41407), as the official pipeline makes it.
Imports ComfyUI only inside ComfyUI (the class is made on first use).
"""
import functools

from sana_core.checkpoints import CheckpointError
from sana_core.controlnet import load_controlnet

from . import host, messages
from .loaders import _installed

KEY = "sana_controls"  # the entry of get_control's dict the model wrapper reads
GRAPH_CHOICES = ["auto", "official", "diffusers"]


def active_controls(control) -> list:
    """The (ControlNet, hint, strength) triples of get_control's output (None: none) for this model call."""
    return list(control.get(KEY, ())) if control else []


def check_controls(control, transformer) -> None:
    """Before sampling (SanaModel.extra_conds): every ControlNet of the chain on a conditioning is a SANA one
    that fits this DiT, or an error in Apply ControlNet's words."""
    sana = control_class()
    while control is not None:
        if not isinstance(control, sana):
            inner = getattr(control, "control_model", None)
            what = type(control).__name__ + (f" of {type(inner).__module__}.{type(inner).__name__}" if inner else "")
            raise ValueError(f"Apply ControlNet: a ControlNet of another model family ({what}, from a loader such as "
                             f"Load ControlNet Model) is applied to a SANA model; SANA takes SANA ControlNets: load "
                             f"one with SANA ControlNet Loader")
        try:
            control.net.check_fits(transformer.config)
        except ValueError as e:
            raise ValueError(f"Apply ControlNet: the ControlNet '{control.name}' does not fit this SANA model: {e}") \
                from None
        control = control.previous_controlnet


@functools.cache
def control_class():
    """comfy.controlnet.ControlBase subclass for SANA ControlNets (made once ComfyUI is importable)."""
    import comfy.controlnet
    import comfy.model_management
    import comfy.utils

    from .comfy_family import SanaLatentFormat

    class SanaControlNet(comfy.controlnet.ControlBase):
        def __init__(self, net, name, patcher):
            super().__init__()
            self.net, self.name, self.patcher = net, name, patcher  # patcher: ComfyUI loads the weights with it
            self.latent_format = SanaLatentFormat()  # Apply ControlNet then asks for a VAE
            self.compression_ratio = 1  # the hint image is resized to the latent's size times the VAE's ratio

        def pre_run(self, model, percent_to_timestep_function):
            if getattr(model, "sana", None) is None:  # comfy_family.SanaModel carries it
                raise ValueError(f"Apply ControlNet: '{self.name}' is a SANA ControlNet, applied to a "
                                 f"{type(model).__name__} model; apply it to a SANA model (SANA Model Loader)")
            super().pre_run(model, percent_to_timestep_function)

        def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
            previous = None
            if self.previous_controlnet is not None:
                previous = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number,
                                                                transformer_options)
            if self.timestep_range is not None and not self.timestep_range[1] <= t[0] <= self.timestep_range[0]:
                return previous  # outside start/end percent: the plain model (or only the previous ones)
            hint = self._hint(x_noisy)
            if x_noisy.shape[0] != hint.shape[0]:
                hint = comfy.controlnet.broadcast_image_to(hint, x_noisy.shape[0], batched_number)
            return {KEY: active_controls(previous) + [(self.net, hint, self.strength)]}

        def _hint(self, x_noisy):
            """The hint image (B, 3, H, W) resized to the latent's image size, encoded by the VAE and scaled by
            the latent format; kept until the size changes."""
            h, w = x_noisy.shape[-2:]
            if self.cond_hint is None or self.cond_hint.shape[-2:] != (h, w):
                if self.vae is None:
                    raise ValueError(f"Apply ControlNet: the SANA ControlNet '{self.name}' needs the vae input "
                                     f"connected (the SANA VAE encodes the hint image)")
                ratio = self.vae.spacial_compression_encode()
                image = comfy.utils.common_upscale(self.cond_hint_original, w * ratio, h * ratio,
                                                   self.upscale_algorithm, "center")
                loaded = comfy.model_management.loaded_models(only_currently_used=True)
                latent = self.vae.encode(image.movedim(1, -1))
                comfy.model_management.load_models_gpu(loaded)  # the VAE may have evicted them (low VRAM)
                if latent.ndim != 4 or latent.shape[1] != SanaLatentFormat.latent_channels:
                    raise ValueError(f"Apply ControlNet: the vae makes {latent.shape[1]}-channel latents; the SANA "
                                     f"ControlNet '{self.name}' needs SANA's 32-channel DC-AE (SANA VAE Loader)")
                self.cond_hint = self.latent_format.process_in(latent).to(x_noisy.device)
            return self.cond_hint

        def copy(self):
            c = SanaControlNet(self.net, self.name, self.patcher)
            self.copy_to(c)
            return c

        def get_models(self):
            return super().get_models() + [self.patcher]

    return SanaControlNet


class SanaControlNetLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "control_net_name": (host.current().list_models("controlnet"), {
                "tooltip": "A SANA ControlNet in models/controlnet: an official NVlabs file (e.g. "
                           "Sana_1600M_1024px_BF16_ControlNet_HED.pth: the whole model, of which only the ControlNet "
                           "is loaded, so it drives any SANA model of its width) or a diffusers SanaControlNetModel "
                           "folder or single file."}),
            "graph": (GRAPH_CHOICES, {
                "default": "auto",
                "tooltip": "How the ControlNet joins the model: NVlabs' graph and diffusers' port compute different "
                           "things with the same weights. auto runs the graph the file was trained with, told by its "
                           "layout: original NVlabs files (the official HED ControlNets) the official graph, "
                           "diffusers-layout files (ports, ControlNets trained with diffusers) diffusers' graph. "
                           "Pick one only for a file you know was trained with the other."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, control_net_name):
        return _installed("controlnet", control_net_name)

    RETURN_TYPES = ("CONTROL_NET",)
    RETURN_NAMES = ("control_net",)
    OUTPUT_TOOLTIPS = ("For the core Apply ControlNet node (give it the SANA VAE: it encodes the hint image). The "
                       "official ControlNets expect HED edges.",)
    FUNCTION = "load"
    CATEGORY = "SANA"
    DESCRIPTION = ("Loads a SANA ControlNet (official NVlabs file or diffusers layout) for the core Apply ControlNet "
                   "nodes, under KSampler, SamplerCustomAdvanced and SANA Sampler.")

    def load(self, control_net_name, graph):
        h = host.current()
        try:
            sana_control_net = control_class()
        except ImportError:
            raise RuntimeError("SANA ControlNet Loader: a CONTROL_NET is for ComfyUI's Apply ControlNet node, which "
                               "sana-run does not stand in for; run this workflow in ComfyUI (in Python: "
                               "SanaPipeline(..., controlnet=load_controlnet(path), control_image=...))") from None
        path = h.find_model("controlnet", control_net_name)
        load_device, offload_device = h.devices("transformer")
        try:
            net = load_controlnet(path, graph=None if graph == "auto" else graph, device=offload_device,
                                  dtype=h.dtype("transformer", "auto", load_device), operations=h.operations())
        except (CheckpointError, OSError, ValueError, KeyError, RuntimeError) as e:
            raise messages.load_error(e, "controlnet", control_net_name) from e
        import comfy.model_patcher
        patcher = comfy.model_patcher.ModelPatcher(net, load_device=load_device, offload_device=offload_device)
        return (sana_control_net(net, control_net_name, patcher),)
