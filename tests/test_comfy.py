"""Runs tests/comfy (the tests that import ComfyUI) under ComfyUI's python: COMFYUI_DIR and
COMFYUI_PYTHON as for the end-to-end tests (.ci/run sets both; skipped only when COMFYUI_DIR is unset)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="set COMFYUI_DIR (and COMFYUI_PYTHON) to run the "
                                                               "tests that import ComfyUI")
def test_comfyui_family_tests_pass_under_comfyuis_python():
    comfyui = os.environ["COMFYUI_DIR"]
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    # cwd: ComfyUI's folder, so that `import nodes` is ComfyUI's module, not this repository's nodes/ folder
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([comfyui, str(ROOT)]), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(ROOT / "tests" / "comfy")],
                            cwd=comfyui, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
