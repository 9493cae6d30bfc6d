"""SANA ControlNet as ComfyUI's CONTROL_NET (a sketch for issue 19; not yet registered in nodes/__init__.py).

The loader returns a `comfy.controlnet.ControlBase`, so the core Apply ControlNet nodes set its hint image,
strength, start/end percent and VAE, and chain several. Per sampling step ComfyUI calls get_control; ours
returns no tensors computed by the ControlNet (the official graph needs base block 0's output, which exists
only inside the model's forward) but what the model wrapper's forward consumes:

    {"sana_controls": [(ControlNet, hint latent (B, 32, h, w), strength), ...]}   # this one and the previous ones

and the wrapper passes `model_control(control, model, caption, context)` as the SanaTransformer's
`control=`. Outside the start/end window get_control returns the previous ControlNets' entry
or None, so the model runs its plain path (bit for bit). The hint image is encoded by the VAE given to Apply
ControlNet and scaled by SANA's latent format (raw DC-AE latent * 0.41407), as the official pipeline does.
Imports ComfyUI only inside ComfyUI (the class is made on first use).
"""
import functools

from sana_core.autoencoder import SCALING_FACTOR
from sana_core.checkpoints import CheckpointError
from sana_core.controlnet import load_controlnet, prepare_controls

KEY = "sana_controls"  # the entry of get_control's dict the model wrapper reads
GRAPH_CHOICES = ["from the file", "official", "diffusers"]


def model_control(control, model, caption, context):
    """What the SANA model wrapper's forward passes as the SanaTransformer's control=, from the `control` ComfyUI
    gives it (get_control's output, or None): the ControlNets prepared for this call's caption, or None."""
    if not control:
        return None
    if KEY not in control:
        raise ValueError("Apply ControlNet: the ControlNet was made for another model family; a SANA model takes "
                         "SANA ControlNets (load them with the SANA ControlNet Loader)")
    return prepare_controls(control[KEY], model, caption, context)


@functools.cache
def control_class():
    """comfy.controlnet.ControlBase subclass for SANA ControlNets (made once ComfyUI is importable)."""
    import comfy.controlnet
    import comfy.latent_formats
    import comfy.model_management
    import comfy.model_patcher
    import comfy.utils

    class SanaLatent(comfy.latent_formats.LatentFormat):  # TODO(merge): issue 16's SANA latent format
        latent_channels = 32
        scale_factor = SCALING_FACTOR

    class SanaControlNet(comfy.controlnet.ControlBase):
        def __init__(self, net, patcher=None):
            super().__init__()
            self.net = net
            self.patcher = patcher or comfy.model_patcher.ModelPatcher(
                net, load_device=comfy.model_management.get_torch_device(),
                offload_device=comfy.model_management.unet_offload_device())
            self.latent_format = SanaLatent()  # Apply ControlNet then asks for a VAE
            self.compression_ratio = 1  # the hint is made at the image size the VAE encodes to the latent's

        def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
            previous = None
            if self.previous_controlnet is not None:
                previous = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number,
                                                                transformer_options)
                if previous is not None and KEY not in previous:
                    raise ValueError("Apply ControlNet: a SANA ControlNet is chained with a ControlNet made for "
                                     "another model family; chain only SANA ControlNets on a SANA model")
            if self.timestep_range is not None and not self.timestep_range[1] <= t[0] <= self.timestep_range[0]:
                return previous  # outside start/end percent: the plain model (or only the previous ones)
            hint = self._hint(x_noisy)
            if x_noisy.shape[0] != hint.shape[0]:
                hint = comfy.controlnet.broadcast_image_to(hint, x_noisy.shape[0], batched_number)
            return {KEY: list(previous[KEY] if previous else []) + [(self.net, hint, self.strength)]}

        def _hint(self, x_noisy):
            """The hint image (B, H, W, 3) resized to the latent's image size, encoded by the VAE and scaled by
            the latent format; kept until the size changes."""
            h, w = x_noisy.shape[-2:]
            if self.cond_hint is None or self.cond_hint.shape[-2:] != (h, w):
                if self.vae is None:
                    raise ValueError("Apply ControlNet: a SANA ControlNet needs the VAE input connected (the SANA "
                                     "VAE encodes the hint image)")
                ratio = self.vae.spacial_compression_encode()
                image = comfy.utils.common_upscale(self.cond_hint_original, w * ratio, h * ratio,
                                                   self.upscale_algorithm, "center")
                self.cond_hint = self.latent_format.process_in(self.vae.encode(image.movedim(1, -1)))
            return self.cond_hint.to(x_noisy.device)

        def copy(self):
            c = SanaControlNet(self.net, self.patcher)
            self.copy_to(c)
            c.latent_format, c.compression_ratio = self.latent_format, self.compression_ratio
            return c

        def get_models(self):
            return super().get_models() + [self.patcher]

    return SanaControlNet


class SanaControlNetLoader:
    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths
        return {"required": {
            "control_net_name": (folder_paths.get_filename_list("controlnet"), {
                "tooltip": "A SANA ControlNet in models/controlnet: the official NVlabs .pth (e.g. the HED "
                           "ControlNet of Sana 0.6B / 1.6B: the whole model, of which only the ControlNet is "
                           "loaded) or a diffusers SanaControlNetModel file."}),
            "graph": (GRAPH_CHOICES, {
                "default": "from the file",
                "tooltip": "How the ControlNet joins the model. The official NVlabs graph and diffusers' port "
                           "compute different things with the same weights. 'from the file': original NVlabs "
                           "files run the official graph, diffusers-layout files diffusers' (the graph they were "
                           "trained with); pick the other only for a file you know was trained with it."}),
        }}

    RETURN_TYPES = ("CONTROL_NET",)
    OUTPUT_TOOLTIPS = ("For the core Apply ControlNet node (give it the SANA VAE). The official models expect "
                       "HED edges.",)
    FUNCTION = "load"
    CATEGORY = "SANA"
    DESCRIPTION = "Loads a SANA ControlNet (official .pth or diffusers layout) for the core Apply ControlNet node."

    def load(self, control_net_name, graph):
        import comfy.model_management as mm
        import folder_paths
        path = folder_paths.get_full_path_or_raise("controlnet", control_net_name)
        device = mm.unet_offload_device()
        try:
            net = load_controlnet(path, graph=None if graph == GRAPH_CHOICES[0] else graph, device=device,
                                  dtype=mm.unet_dtype(device=mm.get_torch_device()))
        except (CheckpointError, OSError, ValueError) as e:
            raise CheckpointError(f"SANA ControlNet Loader: could not load '{control_net_name}': {e}") from e
        return (control_class()(net),)
