"""SANA Quantize Model (save) and GGUF files in the model lists, outside ComfyUI (LocalHost): the node writes the
chosen format into diffusion_models, where SANA Model Loader lists and loads it; it never overwrites a file,
refuses folders in the name and an already quantized source with the node's name, and leaves no half-written
file behind."""
import pytest

from sana_core.demo import write_demo_models
from sana_core.quantized import quantization_summary
from sana_nodes import host
from sana_nodes.loaders import SanaModelLoader
from sana_nodes.quantize import SanaQuantizeModel

pytest.importorskip("gguf")


@pytest.fixture
def local(tmp_path):
    files = write_demo_models(tmp_path)
    previous = host._host
    yield host.use(host.LocalHost(tmp_path, device="cpu")), files["transformer"].name
    host._host = previous


def quantize(**inputs):
    return SanaQuantizeModel().quantize(**inputs)


@pytest.mark.parametrize("fmt, name, qtype", [("Q8_0", "demo_q8.gguf", "Q8_0"), ("Q4_0", "demo_q4.gguf", "Q4_0"),
                                               ("fp8", "demo_fp8.safetensors", "fp8_e4m3fn")])
def test_writes_what_the_loader_lists_and_loads(local, tmp_path, fmt, name, qtype):
    h, source = local
    out = quantize(model_name=source, format=fmt, output_name=name.rpartition(".")[0])
    assert out["result"] == (name,) and (tmp_path / "diffusion_models" / name).is_file()
    assert name in h.list_models("transformer")  # .gguf listed for the DiT too
    model = SanaModelLoader().load(name, "fp32")[0].model
    assert set(quantization_summary(model)) == {qtype}


def test_gguf_files_are_listed_for_the_dit_only(local, tmp_path):
    h, _ = local
    (tmp_path / "text_encoders" / "gemma.gguf").write_bytes(b"")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "old.gguf").write_bytes(b"")
    assert "old.gguf" in h.list_models("transformer") and "gemma.gguf" not in h.list_models("text_encoder")


def test_bad_requests_say_what_to_change_and_write_nothing(local, tmp_path):
    h, source = local
    quantize(model_name=source, format="Q8_0", output_name="taken.gguf")
    before = sorted(p.name for p in (tmp_path / "diffusion_models").iterdir())
    with pytest.raises(FileExistsError, match=r"SANA Quantize Model \(save\): taken.gguf already exists .* another "
                                              r"output_name"):
        quantize(model_name=source, format="Q8_0", output_name="taken")
    with pytest.raises(ValueError, match="output_name '../x' must be a file name without folders"):
        quantize(model_name=source, format="Q8_0", output_name="../x")
    with pytest.raises(ValueError, match=r"cannot quantize taken.gguf: .*already quantized .*bfloat16"):
        quantize(model_name="taken.gguf", format="fp8", output_name="twice")
    assert sorted(p.name for p in (tmp_path / "diffusion_models").iterdir()) == before


def test_cancel_leaves_no_half_written_file(local, tmp_path, monkeypatch):
    h, source = local

    def cancelled():
        raise KeyboardInterrupt  # what ComfyUI's Cancel raises inside a node (InterruptProcessingException)
    monkeypatch.setattr(h, "check_interrupted", cancelled)
    with pytest.raises(KeyboardInterrupt):
        quantize(model_name=source, format="Q8_0", output_name="cancelled")
    assert not (tmp_path / "diffusion_models" / "cancelled.gguf").exists()
