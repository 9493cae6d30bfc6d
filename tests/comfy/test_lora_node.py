"""SANA LoRA Loader, and core LoraLoaderModelOnly, on the SANA MODEL in ComfyUI's own process (CPU, float32, the
demo models and the demo LoRA in models/loras): weight patches on a MODEL clone that stack and unload bit for bit,
errors in the node's words, a LoRA made by ComfyUI's own "Extract and Save LoRA" code read by both loaders, and
sampling after adding or removing a LoRA never replaying a CUDA graph captured with other weights."""
import functools

import pytest
import torch
from safetensors.torch import save_file

import comfy.model_management
import nodes as core
from comfy_extras.nodes_lora_extract import LORAType, calc_lora_model
from comfy_extras.nodes_model_merging import ModelSubtract
from sana_core import runtime as cg
from sana_core.checkpoints import CheckpointError
from sana_core.demo import write_demo_lora
from sana_core.lora import apply_lora
from sana_core.transformer import SanaTransformer
from sana_nodes import host
from comfy_test_helpers import call, rel_err

DEMO_LORA = "sana_demo_lora.safetensors"


@pytest.fixture(scope="module")
def loaded(nodes, models):
    loras = models / "loras"
    write_demo_lora(loras / "second.safetensors", rank=2, alpha=3.0, seed=5)
    write_demo_lora(loras / "narrow.safetensors", width=32)  # for a SANA model of another width
    save_file({f"transformer.single_transformer_blocks.0.attn.to_q.lora_{p}.weight": torch.zeros(4, 4) for p in "AB"},
              loras / "flux_style.safetensors")
    model, = call(nodes["SanaModelLoader"], "sana_demo.safetensors", "fp32")
    clip, = call(nodes["SanaTextEncoderLoader"], "gemma2_demo.safetensors", "fp32", "gpu")
    return dict(model=model, lora=lambda model, name=DEMO_LORA, strength=1.0: call(
                    nodes["SanaLoraLoader"], model, name, strength)[0],
                sample=lambda model: call(
                    nodes["SanaSampler"], model=model, positive=call(nodes["SanaTextEncode"], clip, "a fox", True)[0],
                    negative=call(nodes["SanaTextEncode"], clip, "", False)[0],
                    latent_image=call(nodes["SanaEmptyLatent"], "custom", 64, 64, 1)[0], seed=7, steps=3, cfg=4.5,
                    pag_scale=0.0, flow_shift=0.0, sampler="flow_dpm_solver", denoise=1.0)[0]["samples"],
                ksampler=lambda model: core.KSampler().sample(
                    model, 7, 3, 4.5, "euler", "simple", call(nodes["SanaTextEncode"], clip, "a fox", True)[0],
                    call(nodes["SanaTextEncode"], clip, "", False)[0],
                    call(nodes["SanaEmptyLatent"], "custom", 64, 64, 1)[0])[0]["samples"])


def weights(model):
    """The DiT's weights as the MODEL (with its patches) computes with them."""
    comfy.model_management.load_models_gpu([model])
    return {k: v.clone() for k, v in model.model.diffusion_model.transformer.state_dict().items()}


def test_loras_stack_as_patches_and_unload_bit_for_bit(loaded, models):
    model, lora = loaded["model"], loaded["lora"]
    original, plain = weights(model), loaded["sample"](model)
    with_lora = lora(model)
    assert rel_err(loaded["sample"](with_lora), plain) > 1e-3
    assert not with_lora.patches is model.patches and not model.patches  # a clone carries them, the input is unchanged
    stacked = lora(with_lora, "second.safetensors", -0.5)
    reference = SanaTransformer(model.model.diffusion_model.transformer.config)
    reference.load_state_dict(original)
    apply_lora(reference, models / "loras" / DEMO_LORA, 1.0)
    apply_lora(reference, models / "loras" / "second.safetensors", -0.5)
    patched = weights(stacked)
    assert all(rel_err(patched[k], v) < 1e-6 for k, v in reference.state_dict().items() if v.norm() > 0)
    assert all(torch.equal(v, original[k]) for k, v in weights(model).items())
    assert torch.equal(loaded["sample"](model), plain)
    assert lora(model, strength=0.0) is model


@pytest.mark.parametrize("name, words", [
    ("flux_style.safetensors", "is a LoRA for Flux, not for a SANA transformer"),
    ("narrow.safetensors", "is 64 x 64; the model is"),  # another SANA width: the shapes
])
def test_files_that_do_not_fit_are_refused_in_the_nodes_words(loaded, name, words):
    with pytest.raises(CheckpointError, match=f"SANA LoRA Loader: lora_name '{name}' cannot be applied") as error:
        loaded["lora"](loaded["model"], name)
    assert words in str(error.value)


def test_core_lora_loader_model_only_reads_a_lora_extracted_by_comfyui(loaded, models):
    """ComfyUI's "Extract and Save LoRA" writes our DiT's own names (diffusion_model.transformer.blocks.0.attn.qkv
    .lora_up.weight, fp16), which ComfyUI's generic key map understands: both loaders apply it, identically."""
    model, lora = loaded["model"], loaded["lora"]
    with_lora = lora(model)
    difference, = ModelSubtract().merge(with_lora, model, 1.0)
    extracted = calc_lora_model(difference, 16, "diffusion_model.", "diffusion_model.", {}, LORAType.STANDARD,
                                bias_diff=True)
    assert "diffusion_model.transformer.blocks.0.attn.qkv.lora_up.weight" in extracted
    save_file(extracted, models / "loras" / "extracted.safetensors")
    core_model, = core.LoraLoaderModelOnly().load_lora_model_only(model, "extracted.safetensors", 1.0)
    by_core, by_ours = weights(core_model), weights(lora(model, "extracted.safetensors"))
    expected, original = weights(with_lora), weights(model)
    assert all(torch.equal(by_core[k], by_ours[k]) for k in by_core)
    changed = [k for k, v in expected.items() if not torch.equal(v, original[k])]
    assert changed and all(torch.equal(by_core[k], original[k]) for k in by_core if k not in changed)
    # the extracted updates (fp16 factors of a truncated SVD, clamped at ComfyUI's 99% quantile) approximate the LoRA's
    assert all(rel_err(by_core[k] - original[k], expected[k] - original[k]) < 0.5 for k in changed)
    core_model, = core.LoraLoaderModelOnly().load_lora_model_only(model, DEMO_LORA, 1.0)
    assert not core_model.patches  # a trainer's file (diffusers names): the core loader applies nothing


class GraphStandIn(cg.CapturedCall):
    """What a CUDA graph does, on the CPU: replays fn on static copies of its inputs and constants, reading the
    weight tensors that were there when it was captured (an update in place is seen, a swapped-in tensor is not)."""
    made = []

    def __init__(self, module, fn, inputs, constants, pool):
        self.module, self.fn, self.replays = module, fn, 0
        self.inputs = [t.clone() for t in inputs]
        self.constants = cg._map(torch.clone, constants)
        self.tensors = self._tensors()
        GraphStandIn.made.append(self)

    def _tensors(self):
        return {**dict(self.module.named_parameters()), **dict(self.module.named_buffers())}

    def _put(self, tensors):
        for name, t in tensors.items():
            owner, _, leaf = name.rpartition(".")
            m = self.module.get_submodule(owner)
            (m._parameters if leaf in m._parameters else m._buffers)[leaf] = t

    def __call__(self, inputs):
        for static, value in zip(self.inputs, inputs):
            static.copy_(value)
        now = self._tensors()
        self._put(self.tensors)
        try:
            out = self.fn(*self.inputs, *self.constants)
        finally:
            self._put(now)
        self.replays += 1
        return out


def test_sampling_after_adding_or_removing_a_lora_never_replays_stale_weights(loaded, monkeypatch):
    """ComfyUI patches a LoRA by swapping weight tensors (and back when it is removed): a graph captured before
    would replay the old ones. Its loads drop the runtime's graphs and the captions cached by SanaDiffusionModel,
    and the graphs' weight fingerprint differs: each sampling (SanaSampler's own loop, and KSampler through
    ComfyUI's) re-captures and gives what eager sampling gives."""
    model, with_lora = loaded["model"], loaded["lora"](loaded["model"])
    samplers = ("sample", "ksampler")
    expected = {(s, m): loaded[s](m) for s in samplers for m in (model, with_lora)}  # eager: CPU inputs
    monkeypatch.setattr(cg.GraphedStep, "_why_eager", lambda self, inputs: "")
    monkeypatch.setattr(host.current().runtime, "capture",
                        functools.partial(GraphStandIn, model.model.diffusion_model.transformer))
    GraphStandIn.made = []
    for m in (model, with_lora, model, with_lora):
        for s in samplers:
            captured = len(GraphStandIn.made)
            assert rel_err(loaded[s](m), expected[s, m]) < 1e-6, (s, m is model)
            assert len(GraphStandIn.made) > captured  # captured again with these weights
    assert sum(g.replays for g in GraphStandIn.made) > len(GraphStandIn.made)  # graphs served later steps too
