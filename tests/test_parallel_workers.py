"""sana_core.parallel.Workers (the loader option's engine: one sampling loop in this process, the DiT calls
shared with worker processes) on the CPU with gloo: sampling equals one process's, patched weights reach the
workers, a killed worker gives a clear error and the next call starts the workers again."""
import os
import signal

import pytest
import torch
from conftest import rel_err

from sana_core import load_transformer, parallel
from sana_core.demo import write_demo_transformer
from sana_core.guidance import sample_latents


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    return write_demo_transformer(tmp_path_factory.mktemp("workers") / "dit.safetensors")


@pytest.fixture
def workers(dit_file):
    workers = parallel.Workers(["cpu", "cpu"], {"path": dit_file, "dtype": torch.float32}, timeout=60)
    yield workers
    workers.stop()


def sample(dit, steps=3):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((1, 32, 6, 5), generator=g)
    cond, uncond = torch.randn((1, 5, 64), generator=g), torch.randn((1, 4, 64), generator=g)
    return sample_latents(dit, noise, cond, None, uncond, None, sampler="flow_dpm_solver", steps=steps, cfg=4.5,
                          shift=3.0)


def test_workers_sample_as_one_process_carry_patched_weights_and_restart_after_a_killed_worker(dit_file, workers):
    model = load_transformer(dit_file, dtype=torch.float32).eval()
    single = sample(model)
    workers.start()
    assert rel_err(sample(workers.transformer(model)), single) < 1e-5

    name = next(n for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks.1"))
    param = dict(model.named_parameters())[name]
    original = param.detach().clone()
    with torch.no_grad():
        param.mul_(1.5)  # as a merged LoRA would change it
    patched_single = sample(model)
    assert rel_err(patched_single, single) > 1e-3
    workers.weights = lambda: ("lora", {name: lambda: param.detach()})
    assert rel_err(sample(workers.transformer(model)), patched_single) < 1e-5
    with torch.no_grad():
        param.copy_(original)
    workers.weights = lambda: ("none", {})  # the workers put their own weight back
    assert rel_err(sample(workers.transformer(model)), single) < 1e-5
    with torch.no_grad():
        param.mul_(1.5)
    workers.weights = lambda: ("lora", {name: lambda: param.detach()})

    def kill_at_step_2(step, total, x0):
        if step == 2:
            os.kill(workers.procs[0][0].pid, signal.SIGKILL)
    g = torch.Generator().manual_seed(0)
    noise, cond = torch.randn((1, 32, 6, 5), generator=g), torch.randn((1, 5, 64), generator=g)
    with pytest.raises(parallel.ParallelError, match=r"worker process on cpu \(rank 1\) was killed by signal 9"):
        sample_latents(workers.transformer(model), noise, cond, None, sampler="flow_euler", steps=5, cfg=1.0,
                       shift=3.0, callback=kill_at_step_2)
    assert workers.comm is None and not torch.distributed.is_initialized()
    assert rel_err(sample(workers.transformer(model)), patched_single) < 1e-5  # started again, weights sent again
