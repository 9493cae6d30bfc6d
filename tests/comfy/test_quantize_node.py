"""Inside ComfyUI: SANA Quantize Model (save) writes into the diffusion_models folder that folder_paths knows, and
SANA Model Loader lists the .gguf files there (registered as ComfyUI-GGUF does, `unet_gguf`), while ComfyUI's
own diffusion_models list (core UNETLoader, which cannot read GGUF) stays as it was."""
import folder_paths  # ComfyUI and the pack are loaded by tests/comfy/conftest.py


def test_quantize_node_writes_where_the_loader_lists_gguf(nodes, models):
    source = "sana_demo.safetensors"
    out = nodes["SanaQuantizeModel"]().quantize(model_name=source, format="Q8_0", output_name="sana_demo_q8")
    assert out["result"] == ("sana_demo_q8.gguf",) and (models / "diffusion_models" / "sana_demo_q8.gguf").is_file()
    assert "sana_demo_q8.gguf" in nodes["SanaModelLoader"].INPUT_TYPES()["required"]["model_name"][0]
    assert "sana_demo_q8.gguf" not in folder_paths.get_filename_list("diffusion_models")
    model = nodes["SanaModelLoader"]().load("sana_demo_q8.gguf", "fp32")[0]
    assert model.model.diffusion_model.transformer.blocks[0].attn.qkv.qtype == "Q8_0"
