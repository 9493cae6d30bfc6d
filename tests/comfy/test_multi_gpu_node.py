"""SanaModelLoader's gpus in ComfyUI's own process (CPU; one gloo CPU worker process, gpus "cpu,cpu"):
SanaSampler and KSampler on the shared model equal one process, a LoRA's weight patches reach the worker,
patches it cannot carry are refused by name, and the worker stops when the model is freed."""
import gc
from pathlib import Path

import pytest
from safetensors.torch import load_file

import nodes as core
from sana_core.demo import write_demo_lora
from sana_nodes.lora import lora_patches
from comfy_test_helpers import call, rel_err

SEED = 7


@pytest.fixture(scope="module")
def loaded(nodes):
    single, = call(nodes["SanaModelLoader"], "sana_demo.safetensors", "fp32")
    shared, = call(nodes["SanaModelLoader"], "sana_demo.safetensors", "fp32", gpus="cpu,cpu")
    clip, = call(nodes["SanaTextEncoderLoader"], "gemma2_demo.safetensors", "fp32", "gpu")
    positive, = call(nodes["SanaTextEncode"], clip, "a red fox in the snow", True)
    negative, = call(nodes["SanaTextEncode"], clip, "", False)
    latent, = call(nodes["SanaEmptyLatent"], "custom", 64, 96, 1)
    yield dict(single=single, shared=shared, positive=positive, negative=negative, latent=latent)
    shared.model.diffusion_model.workers.stop()


def sana_sampler(nodes, loaded, model, **settings):
    kw = dict(model=model, positive=loaded["positive"], negative=loaded["negative"], latent_image=loaded["latent"],
              seed=SEED, steps=3, cfg=4.5, pag_scale=0.0, flow_shift=0.0, sampler="flow_dpm_solver", denoise=1.0)
    kw.update(settings)
    return call(nodes["SanaSampler"], **kw)[0]["samples"]


def ksampler(loaded, model):
    return core.KSampler().sample(model, SEED, 3, 4.5, "euler", "simple", loaded["positive"], loaded["negative"],
                                  loaded["latent"])[0]["samples"]


def with_lora(model, path):
    lora = model.clone()
    lora.add_patches(lora_patches(Path(path).name, load_file(path), {}, model.model.diffusion_model.transformer), 0.8)
    return lora


def test_samplers_on_the_shared_model_equal_one_process(nodes, loaded):
    workers = loaded["shared"].model.diffusion_model.workers
    assert workers is not None and workers.comm is not None  # started by the loader
    assert rel_err(sana_sampler(nodes, loaded, loaded["shared"]), sana_sampler(nodes, loaded, loaded["single"])) < 1e-5
    assert rel_err(sana_sampler(nodes, loaded, loaded["shared"], pag_scale=2.0),
                   sana_sampler(nodes, loaded, loaded["single"], pag_scale=2.0)) < 1e-5
    assert rel_err(ksampler(loaded, loaded["shared"]), ksampler(loaded, loaded["single"])) < 1e-5


def test_lora_weight_patches_reach_the_worker(nodes, loaded, tmp_path):
    path = write_demo_lora(tmp_path / "lora.safetensors", rank=4, seed=3)
    plain = sana_sampler(nodes, loaded, loaded["single"])
    single = sana_sampler(nodes, loaded, with_lora(loaded["single"], path))
    assert rel_err(single, plain) > 1e-3
    assert rel_err(sana_sampler(nodes, loaded, with_lora(loaded["shared"], path)), single) < 1e-5
    shared, single = (ksampler(loaded, with_lora(loaded[m], path)) for m in ("shared", "single"))
    assert rel_err(shared, single) < 1e-5
    assert rel_err(sana_sampler(nodes, loaded, loaded["shared"]), plain) < 1e-5  # the worker's weights restored


def test_patches_the_workers_cannot_carry_are_refused_by_name(nodes, loaded):
    model = loaded["shared"].clone()
    name = "diffusion_model.transformer.blocks.1.mlp"  # (another node's replacement; here the same module)
    model.add_object_patch(name, model.get_model_object(name))
    with pytest.raises(ValueError, match=r"object patches \(diffusion_model.transformer.blocks.1.mlp\).*gpus to 1"):
        ksampler(loaded, model)


def test_bad_gpus_values_say_what_to_give(nodes):
    for gpus, message in (("2", "not a GPU"), ("cuda:0,cpu", "first device must be the one ComfyUI samples on"),
                          ("cpu,banana", "device list")):
        with pytest.raises(ValueError, match=message):
            call(nodes["SanaModelLoader"], "sana_demo.safetensors", "fp32", gpus=gpus)
    with pytest.raises(ValueError, match="fp8_e4m3fn_fast is not carried to the worker processes"):
        call(nodes["SanaModelLoader"], "sana_demo.safetensors", "fp8_e4m3fn_fast", gpus="cpu,cpu")


def test_the_workers_stop_when_the_model_is_freed(nodes):
    model, = call(nodes["SanaModelLoader"], "sana_demo.safetensors", "fp32", gpus="cpu,cpu")
    workers = model.model.diffusion_model.workers
    process = workers.procs[0][0]
    del model
    gc.collect()
    assert workers.comm is None and process.wait(timeout=30) is not None
