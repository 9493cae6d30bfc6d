"""Several processes, one image (sana_core.parallel), on the CPU with gloo: sampling split by batch
(CFG / PAG branches), by row bands (odd splits) and both equals single-process sampling, the split
decode equals the single decode, with 2, 3, 4 and 8 processes; a killed process gives a clear error,
not a hang; SanaPipeline(devices=...) spawns workers, samples, cancels and shuts down."""
import functools
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import rel_err

from sana_core import parallel
from sana_core.autoencoder import DCAE, DCAEConfig
from sana_core.parallel import Plan, choose_plan, split
from sana_core.guidance import sample_latents
from sana_core.transformer import SanaConfig, SanaTransformer, random_state_dict

# width 64, 2 heads of 32; the 2K position embedding, so that each band must add its own rows' part
CONFIG = SanaConfig(depth=2, width=64, caption_dim=32, self_heads=2, cross_heads=2, mlp_hidden=160,
                    pe_interpolation=1.0, base_size=16)
LATENT = (13, 6)  # latent rows x columns: 13 rows make odd band splits (7 + 6, 5 + 4 + 4, 4 + 3 + 3 + 3)
TOL = 1e-5


def tiny_dit():
    model = SanaTransformer(CONFIG)
    model.load_state_dict(random_state_dict(CONFIG, seed=1))
    return model.eval()


def tiny_dcae():
    widths = (8, 16, 32, 32, 64, 64)
    torch.manual_seed(2)
    model = DCAE(DCAEConfig(decoder_widths=widths, encoder_widths=widths, head_dim=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def sample(model, batch=1, pag=False):
    """3 Flow-DPM-Solver steps with CFG (and PAG): DiT calls of batch 2 (3 with PAG) x `batch`."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((batch, 32, *LATENT), generator=g)
    cond, uncond = torch.randn((batch, 5, 32), generator=g), torch.randn((1, 4, 32), generator=g)
    return sample_latents(model, noise, cond, None, uncond, None, sampler="flow_dpm_solver", steps=3, cfg=4.5,
                          pag_scale=2.0 if pag else 0.0, pag_layers=(1,), shift=3.0)


def decode_latent():
    return torch.randn((1, 32, 5, 3), generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------------- process harness

def _entry(rank, world, folder, case, timeout):
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(folder, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=timeout))
    try:
        result = case(parallel.Comm("cpu", timeout))
        torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run(world, case, tmp_path, timeout=60.0, allowed_deaths=0):
    """case(comm) in `world` gloo processes; returns each rank's result (None for a rank that died)."""
    ctx = mp.start_processes(_entry, args=(world, str(tmp_path), case, timeout), nprocs=world, join=False,
                             start_method="spawn")
    for p in ctx.processes:
        p.join(timeout + 60)
    alive = [p.pid for p in ctx.processes if p.is_alive()]
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    assert not alive, f"processes {alive} hung"
    codes = [p.exitcode for p in ctx.processes]
    assert sum(c != 0 for c in codes) <= allowed_deaths, f"exit codes {codes}"
    return [torch.load(tmp_path / f"rank{r}.pt") if (tmp_path / f"rank{r}.pt").exists() else None
            for r in range(world)]


def _cases(comm, plans):
    """Each (plan, batch, pag) sampled in parallel, then the decode: every rank returns its outputs."""
    out = [sample(parallel.ParallelTransformer(tiny_dit(), comm, plan), batch, pag) for plan, batch, pag in plans]
    return out + [parallel.decode(tiny_dcae(), decode_latent(), comm)]


def _two(comm):  # CFG branches on the two ranks; two row bands (7 + 6 rows); CFG + PAG (3 calls over 2 ranks)
    return _cases(comm, [(Plan(2, 1), 1, False), (Plan(1, 2), 1, False), (Plan(2, 1), 1, True)])


def _three(comm):  # 5 + 4 + 4 row bands; CFG + PAG branches on three ranks; batch 2 x CFG on 3 ranks, 1 idle
    return _cases(comm, [(Plan(1, 3), 1, False), (Plan(3, 1), 1, True), (Plan(2, 1), 2, False)])


def _four(comm):  # 2 CFG x 2 bands
    return _cases(comm, [(Plan(2, 2), 1, False)])


def _eight(comm):  # 2 CFG x 4 bands (4 + 3 + 3 + 3 rows)
    return _cases(comm, [(Plan(2, 4), 1, False)])


CASES = {2: (_two, [(1, False), (1, False), (1, True)]), 3: (_three, [(1, False), (1, True), (2, False)]),
         4: (_four, [(1, False)]), 8: (_eight, [(1, False)])}


@pytest.fixture(scope="module")
def references():
    with torch.no_grad():
        model = tiny_dit()
        return {key: sample(model, *key) for key in [(1, False), (1, True), (2, False)]}, \
            tiny_dcae().decode(decode_latent())


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_parallel_sampling_and_decode_equal_single_process(world, tmp_path, references):
    """Every rank ends with the single-process latent (float32, rel < 1e-5) for every plan, and the same
    decoded image (the 4- and 8-process runs of issue 23 together: 66 s of CPU, mostly each process
    importing torch)."""
    samples, image = references
    case, keys = CASES[world]
    results = run(world, case, tmp_path)
    for rank, result in enumerate(results):
        for key, latent in zip(keys, result[:-1]):
            assert rel_err(latent, samples[key]) < TOL, (world, rank, key)
        assert rel_err(result[-1], image) < TOL, (world, rank)


def test_choose_plan():
    assert choose_plan(2, 2, 32) == Plan(2, 1)  # 1024 px, CFG: the branches, no bands
    assert choose_plan(2, 2, 128) == Plan(2, 1)  # 4K, CFG: still the branches first
    assert choose_plan(2, 1, 128) == Plan(1, 2)  # 4K, no CFG: bands
    assert choose_plan(4, 2, 128) == Plan(2, 2)
    assert choose_plan(8, 2, 128) == Plan(2, 4)
    assert choose_plan(8, 2, 64) == Plan(2, 4)  # 2K: 16 rows per band
    assert choose_plan(8, 2, 32) == Plan(2, 1)  # 1024 px: bands do not pay, 6 processes wait
    assert choose_plan(3, 2, 32) == Plan(2, 1)  # 1 waits
    assert choose_plan(3, 2, 128) == Plan(1, 3)  # 2/3 of a latent each, not 1
    assert choose_plan(3, 3, 128) == Plan(3, 1)  # CFG + PAG
    assert choose_plan(4, 3, 128) == Plan(1, 4)  # not 2 + 1 latents over 2 x 2
    assert split(13, 3) == [(0, 5), (5, 9), (9, 13)]


def _killed(comm):
    """Rank 1 dies inside its second DiT call; rank 0 must raise ParallelError quickly."""
    model = tiny_dit()
    calls = []

    def die(*_):
        calls.append(1)
        if comm.rank == 1 and len(calls) == 2:
            os._exit(3)
    model.blocks[1].register_forward_pre_hook(die)
    start = time.monotonic()
    try:
        sample(parallel.ParallelTransformer(model, comm, Plan(1, 2)))
    except parallel.ParallelError as e:
        return str(e), time.monotonic() - start
    return "no error", 0.0


def test_killed_process_gives_a_clear_error_not_a_hang(tmp_path):
    results = run(2, _killed, tmp_path, timeout=20.0, allowed_deaths=1)
    message, seconds = results[0]
    assert results[1] is None
    assert "rank 0 of 2" in message and "Another process died" in message, message
    assert seconds < 20


PIPELINE_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from sana_core import load_autoencoder, load_text_encoder, load_transformer
    from sana_core.demo import write_demo_models
    from sana_core.parallel import Plan
    from sana_core.pipeline import SanaPipeline

    def main():
        paths = write_demo_models(sys.argv[1])
        def parts():
            return (load_transformer(paths["transformer"], device="cpu", dtype=torch.float32),
                    load_autoencoder(paths["autoencoder"], device="cpu", dtype=torch.float32),
                    load_text_encoder(paths["text_encoder"], device="cpu", dtype=torch.float32))
        args = dict(width=192, height=160, steps=3, seed=5, output="tensor")
        single = SanaPipeline(*parts())("a red fox", **args)
        pipe = SanaPipeline(*parts(), devices=["cpu", "cpu"], plan=Plan(1, 2), timeout=10)
        image = pipe("a red fox", **args)
        err = ((image - single).norm() / single.norm()).item()
        assert err < 1e-5, err
        def cancel(step, total, x0):
            if step == 2:
                raise KeyboardInterrupt("Cancel")
        try:
            pipe("a red fox", callback=cancel, **args)
            raise AssertionError("not cancelled")
        except KeyboardInterrupt:
            pass
        time.sleep(12)  # idle longer than the collectives' timeout: the workers wait for calls without one
        again = pipe("a red fox", **args)  # the workers are still there after a Cancel
        assert torch.equal(again, image)
        pipe.close()
        print("OK", err)

    if __name__ == "__main__":  # the spawned workers import this script
        main()
""")


def test_pipeline_devices_spawns_workers_cancels_and_closes(tmp_path):
    """SanaPipeline(..., devices=["cpu", "cpu"]) from a fresh process (as a user's script): the image equals
    the single-process one, a Cancel from the callback stops every process, the next call works (after an
    idle wait longer than the timeout), close() ends the workers (the script exits)."""
    script = tmp_path / "run.py"
    script.write_text(PIPELINE_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "models")], capture_output=True, text=True,
                          timeout=300, env=env, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_attention_reduce_adds_the_other_bands_sums(backend):
    """The band hook of the linear attention: the tokens' KV / Ksum sums pass through `reduce` before they
    are applied; adding the other tokens' sums there gives the whole sequence's attention (Triton under
    TRITON_INTERPRET on the CPU)."""
    from sana_core.kernels import linear_attention_torch, linear_attention_triton
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn((2, 40, 64), generator=g) for _ in range(3))
    whole = linear_attention_torch(q, k, v, head_dim=32)
    rest = []
    linear_attention_torch(q[:, 17:], k[:, 17:], v[:, 17:], head_dim=32,
                           reduce=lambda kv, ks: rest.append((kv, ks)) or (kv, ks))  # keeps the other part's sums
    attend = functools.partial(linear_attention_triton, block_n=16, block_m=16, split=2) if backend == "triton" \
        else linear_attention_torch  # Triton: two token ranges, their partial sums added before `reduce`
    top = attend(q[:, :17], k[:, :17], v[:, :17], head_dim=32,
                 reduce=lambda kv, ks: (kv + rest[0][0], ks + rest[0][1]))
    assert rel_err(top, whole[:, :17]) < 1e-6


def test_sana_run_devices_makes_the_single_process_image(tmp_path):
    """sana-run --devices cpu,cpu (a second process spawned, gloo) saves the image one process makes, at a
    size where the chosen plan cuts the 2K-tall latent into row bands as well."""
    from PIL import Image

    from sana_nodes.runner import main
    workflow = str(Path(__file__).parent.parent / "workflows" / "api" / "sana_1024_text_to_image.json")
    # no CFG: one latent per call, so two 32-row bands
    sets = ["--set", "SanaSampler.steps=2", "--set", "SanaSampler.cfg=1", "--set", "SanaEmptyLatent.preset=custom",
            "--set", "SanaEmptyLatent.width=128", "--set", "SanaEmptyLatent.height=2048"]
    argv = [workflow, "--write-demo-models", str(tmp_path / "models"), "--demo", "--cpu", *sets,
            "--output", str(tmp_path / "single")]
    assert main(argv) == 0
    argv = [workflow, "--models", str(tmp_path / "models"), "--demo", "--devices", "cpu,cpu", *sets,
            "--output", str(tmp_path / "parallel")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "sana_nodes.runner", *argv], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    single, = (tmp_path / "single").rglob("*.png")
    par, = (tmp_path / "parallel").rglob("*.png")
    a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (single, par))
    assert a.shape == (2048, 128, 3) and np.abs(a - b).max() <= 1
