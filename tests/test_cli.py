"""`python -m sana_core generate`: images with their settings in the PNG, a progress bar, and
one-line errors (exit status 2, no traceback) for files and sizes the user must fix."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sana_core.__main__ import main
from sana_core.demo import write_demo_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_demo_models(tmp_path_factory.mktemp("models"))


def args(models, out, *extra):
    return ["generate", "--prompt", "a red fox in the snow", "--transformer", str(models["transformer"]),
            "--vae", str(models["autoencoder"]), "--text-encoder", str(models["text_encoder"]), "--out", str(out),
            "--width", "96", "--height", "64", "--steps", "2", "--device", "cpu", *extra]


def test_generate_writes_png_with_seed_and_settings(models, tmp_path, capsys):
    out = tmp_path / "fox.png"
    assert main(args(models, out, "--seed", "7", "--cfg", "3.5", "--negative-prompt", "blurry")) == 0
    image = Image.open(out)
    assert image.size == (96, 64) and image.mode == "RGB"
    record = json.loads(image.text["sana"])
    assert record["seed"] == 7 and record["steps"] == 2 and record["cfg"] == 3.5
    assert record["sampler"] == "flow_dpm_solver" and record["width"] == 96 and record["height"] == 64
    assert record["negative_prompt"] == "blurry" and record["prompt"] == "a red fox in the snow"
    assert record["shift"] == 3.0 and record["transformer"] == models["transformer"].name
    assert "Seed: 7" in image.text["parameters"] and "Size: 96x64" in image.text["parameters"]
    err = capsys.readouterr().err
    assert "sampling" in err and "2/2" in err  # the progress bar

    again = tmp_path / "again.png"
    assert main(args(models, again, "--seed", "7", "--cfg", "3.5", "--negative-prompt", "blurry")) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(image))  # same seed, same image
    other = tmp_path / "other.png"
    assert main(args(models, other, "--seed", "8", "--cfg", "3.5", "--negative-prompt", "blurry")) == 0
    assert not np.array_equal(np.asarray(Image.open(other)), np.asarray(image))


def test_batch_writes_numbered_files(models, tmp_path):
    out = tmp_path / "sub" / "batch.png"
    assert main(args(models, out, "--batch-size", "2", "--steps", "1")) == 0
    first, second = (Image.open(tmp_path / "sub" / f"batch_{i}.png") for i in (1, 2))
    assert [json.loads(im.text["sana"])["batch_index"] for im in (first, second)] == [0, 1]
    assert not out.exists()


def test_sprint_model_defaults_to_scm(models, tmp_path):
    out = tmp_path / "sprint.png"
    argv = args(models, out)
    argv[argv.index("--transformer") + 1] = str(models["sprint"])
    argv.remove("--steps"), argv.remove("2")
    assert main(argv) == 0
    record = json.loads(Image.open(out).text["sana"])
    assert (record["sampler"], record["steps"], record["cfg"], record["model"].startswith("custom")) == \
        ("scm", 2, 4.5, True)


@pytest.mark.parametrize("change, message", [
    (("--vae", "missing.safetensors"), "error: --vae: no such file or folder: "),
    (("--width", "100"), "error: width 100 is not a positive multiple of 32"),
    (("--steps", "0"), "error: steps must be a positive whole number"),
    (("--out", "fox.jpg"), "error: --out must name a .png file"),
    (("--sampler", "scm"), "error: the 'scm' sampler needs a Sana-Sprint model"),
])
def test_user_errors_are_one_line_with_status_2(models, tmp_path, capsys, change, message):
    argv = args(models, tmp_path / "x.png")
    flag, value = change
    value = str(tmp_path / value) if flag in ("--vae", "--out") else value
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_wrong_component_file_is_a_clear_error(models, tmp_path, capsys):
    argv = args(models, tmp_path / "x.png")
    argv[argv.index("--transformer") + 1] = str(models["autoencoder"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is not a SANA transformer" in err and "Traceback" not in err


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    """As users run it: a fresh interpreter, a missing file."""
    result = subprocess.run([sys.executable, "-m", "sana_core", "generate", "--prompt", "x", "--transformer",
                             str(tmp_path / "nope.safetensors"), "--vae", str(tmp_path), "--text-encoder",
                             str(tmp_path), "--out", str(tmp_path / "x.png")],
                            capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --transformer: no such file or folder: {tmp_path / 'nope.safetensors'}"


def test_fp8_compute_dtype_generates_with_the_fallback_on_the_cpu(models, tmp_path, caplog):
    """--dtype fp8_e4m3fn_fast: the DiT in fp8 (here the CPU's fallback, said in the log), the rest in auto."""
    out = tmp_path / "fp8.png"
    assert main(args(models, out, "--dtype", "fp8_e4m3fn_fast")) == 0
    assert Image.open(out).size == (96, 64) and "no fp8 matmuls" in caplog.text
