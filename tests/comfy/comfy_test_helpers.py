"""Helpers shared by the tests/comfy modules (conftest.py puts this folder on sys.path)."""


def rel_err(ours, ref) -> float:
    """||ours - ref|| / ||ref||, in float64."""
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def call(cls, *args, **kwargs):
    """Run a node class's function as ComfyUI does; its outputs (the 'result' of a node that also shows text)."""
    out = getattr(cls(), cls.FUNCTION)(*args, **kwargs)
    return out["result"] if isinstance(out, dict) else out
