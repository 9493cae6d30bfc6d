import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():  # test_kernels runs the Triton kernels on the CPU; must precede any @triton.jit
    os.environ.setdefault("TRITON_INTERPRET", "1")


# tests/comfy import ComfyUI: tests/test_comfy.py runs them under ComfyUI's python
_comfy = importlib.util.find_spec("comfy")  # ComfyUI's package, not the namespace package tests/comfy itself
collect_ignore = [] if _comfy is not None and _comfy.origin is not None else ["comfy"]
if os.environ.get("SANA_BROWSER_TEST") != "1":  # opt-in (README "More tests"): it needs Chromium and playwright
    collect_ignore.append("e2e/test_browser.py")


def rel_err(ours, ref) -> float:
    """||ours - ref|| / ||ref|| over the whole tensor, in float64."""
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).norm() / ref.norm()).item()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
