"""SANA's samplers as ComfyUI objects: a SAMPLER and a SIGMAS node for SamplerCustomAdvanced, and
perturbed-attention guidance as a MODEL patch (for KSampler, the guiders and SanaSampler alike).

Sana-Sprint through SamplerCustomAdvanced: SanaSamplerSelect with sampler scm, whose `guidance` is the
guidance scale embedded in the model (given to the DiT as transformer_options["sana_guidance"]); use
BasicGuider (or CFGGuider with cfg 1: Sprint needs no negative pass) and SanaScheduler with sampler scm.
"""
import torch
from sana_core import samplers
from sana_core.presets import defaults_for

from . import host
from .sampling import model_patch_settings


class SanaSamplerSelect:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sampler": (list(samplers.SAMPLERS), {
                "default": "flow_dpm_solver",
                "tooltip": "flow_dpm_solver: SANA's DPM-Solver++ 2M in the flow's own log-SNR, the DiT at the integer "
                           "timesteps of the references; flow_euler; scm: Sana-Sprint's consistency steps (with "
                           "SanaScheduler set to scm)."}),
            "guidance": ("FLOAT", {"default": 4.5, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                   "tooltip": "Sana-Sprint models only: the guidance scale embedded in the model "
                                              "(no negative pass; use BasicGuider or cfg 1)."}),
        }}

    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("The sampler, for SamplerCustomAdvanced / SamplerCustom.",)
    FUNCTION = "get_sampler"
    CATEGORY = "SANA/sampling"
    DESCRIPTION = ("SANA's own samplers (Flow-DPM-Solver, Flow Euler, Sana-Sprint's sCM) as a ComfyUI SAMPLER, for "
                   "SamplerCustomAdvanced with SanaScheduler's sigmas.")

    def get_sampler(self, sampler, guidance):
        return (host.current().sampler(sampler, guidance),)


class SanaScheduler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SANA model: its variant's (or ModelSamplingSD3's) shift is used "
                                           "when flow_shift is 0."}),
            "sampler": (list(samplers.SAMPLERS), {
                "default": "flow_dpm_solver",
                "tooltip": "The grid: flow_dpm_solver's (the shifted linspace of the references), flow_euler's "
                           "(diffusers' FlowMatchEuler grid) or scm's (Sana-Sprint's times, as flow sigmas)."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 1000,
                              "tooltip": "Steps: 20 for flow_dpm_solver, 28 for flow_euler, 1-4 for scm."}),
            "flow_shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                     "tooltip": "Shift of the flow grid; 0 = the model's (ModelSamplingSD3, else the "
                                                "variant's default at its trained size). Unused by scm."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "Below 1: the last `steps` of a longer grid, as KSampler does."}),
        }}

    RETURN_TYPES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("The sigmas (float, ending at 0), for SamplerCustomAdvanced.",)
    FUNCTION = "get_sigmas"
    CATEGORY = "SANA/sampling"
    DESCRIPTION = "SANA's flow-shifted time grid as SIGMAS, the one SanaSampler uses, with denoise."

    def get_sigmas(self, model, sampler, steps, flow_shift, denoise):
        if denoise <= 0.0:
            return (torch.FloatTensor([]),)
        _, patched_shift = model_patch_settings(model)
        config = host.unwrap(model, "transformer", "SanaScheduler").model.config
        if sampler == "scm":
            return (samplers.scm_sigmas(steps, denoise),)
        shift = flow_shift or patched_shift or defaults_for(config)["shift"] or 3.0
        return (samplers.schedule(sampler, steps, shift, denoise),)


class SanaPAG:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SANA model to patch."}),
            "scale": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 20.0, "step": 0.1, "round": 0.01,
                                "tooltip": "Perturbed-attention guidance scale (2.0 official; 0 = off). One more "
                                           "DiT pass per step."}),
            "layers": ("STRING", {"default": "",
                                  "tooltip": "Blocks whose self-attention is replaced by the identity, e.g. '8' or "
                                             "'8,9'; empty = the variant's default (8 for the 1.6B family, 14 for "
                                             "the 0.6B)."}),
        }}

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with perturbed-attention guidance, for KSampler, the guiders or SanaSampler.",)
    FUNCTION = "patch"
    CATEGORY = "SANA/sampling"
    DESCRIPTION = ("Perturbed-attention guidance for SANA (MODEL in, MODEL out): adds scale x (cond - perturbed "
                   "cond) after CFG, the perturbed pass with identity self-attention in the chosen blocks.")

    def patch(self, model, scale, layers):
        config = host.unwrap(model, "transformer", "SanaPAG").model.config
        try:
            chosen = tuple(int(x) for x in layers.replace(" ", "").split(",") if x) or \
                tuple(defaults_for(config)["pag_layers"])
        except ValueError:
            raise ValueError(f"SanaPAG: layers {layers!r} is not a list of block numbers like '8' or '8,9'") from None
        bad = [i for i in chosen if not 0 <= i < config.depth]
        if bad:
            raise ValueError(f"SanaPAG: layers {bad} out of range: this model has blocks 0..{config.depth - 1}")
        if config.sprint:
            raise ValueError("SanaPAG: Sana-Sprint models take no perturbed-attention guidance")
        return (host.current().pag_patch(model, scale, chosen),)
