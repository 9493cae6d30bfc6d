import pytest
import torch


def rel_err(ours, ref) -> float:
    """||ours - ref|| / ||ref|| over the whole tensor, in float64."""
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).norm() / ref.norm()).item()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
