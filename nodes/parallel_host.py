"""Several GPUs, one image (sana_core.parallel), two ways:

SanaModelLoader's `gpus` (ComfyUI and sana-run): `start_workers` starts one worker process per extra GPU
(parallel.Workers), each loading the same DiT file; every sampler's DiT calls (SanaSampler, KSampler,
SamplerCustomAdvanced) are shared with them while the sampling loop, progress, previews and Cancel stay in
this process. Inside ComfyUI the workers also get the MODEL's weight patches (LoRAs; comfy_family.py).

sana-run --devices 0,1: every process runs the whole workflow (same files, same seeds) on its device; the
SANA DiT calls and VAE decodes are shared out and their outputs exchanged, so every process holds the same
images. Process 0 is the one started from the command line: it spawns the others and alone shows progress
and saves images (the others save into a temporary folder that is deleted).
"""
import os
import shutil
import tempfile
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import sana_core.fp8
from sana_core import parallel, runtime

from . import host
from .runner import WorkflowError


class ParallelHost(host.LocalHost):
    """A LocalHost whose SANA DiT and VAE are parallel.ParallelTransformer / ParallelAutoencoder."""

    def __init__(self, comm: parallel.Comm, workers=None, **kw):
        super().__init__(**kw)
        self.comm, self.workers = comm, workers

    def manage(self, kind, model, path, load_device, offload_device) -> host.ManagedModel:
        if kind == "transformer":
            model = parallel.ParallelTransformer(model, self.comm)
        elif kind == "autoencoder":
            model = parallel.ParallelAutoencoder(model, self.comm)
        return super().manage(kind, model, path, load_device, offload_device)

    def progress(self, total: int, desc: str = ""):
        return super().progress(total, desc) if self.comm.rank == 0 else (lambda *a, **k: None)

    def close(self):
        """Process 0 waits for the others to finish the workflow; every process leaves the group."""
        if self.workers is not None:
            self.workers.join()
        else:
            shutil.rmtree(self.output_dir, ignore_errors=True)
        dist.destroy_process_group()


def parallel_host(devices: str, argv, worker, *, models_dir, output_dir, input_dir, timeout=parallel.DEFAULT_TIMEOUT):
    """The host of this process for `--devices` ("0,1", "cpu,cpu"): process 0 (worker None) spawns one
    process per other device, each running sana-run with the same argv (worker = (rank, port))."""
    devices = [parallel.device_of(d.strip()) for d in devices.split(",") if d.strip()]
    if len(devices) < 2:
        raise WorkflowError(f"--devices {devices}: name two or more devices, e.g. 0,1")
    os.environ[runtime.ENV] = "0"  # the graphs would capture the collectives
    workers = None
    if worker is None:
        rank, port = 0, parallel._free_port()
        workers = mp.start_processes(_worker, args=(list(argv), port), nprocs=len(devices) - 1, join=False,
                                     start_method="spawn")
    else:
        rank, port = worker
        output_dir = tempfile.mkdtemp(prefix="sana-run-worker-")
    parallel._init_group(devices[rank], rank, len(devices), timeout, port)
    comm = parallel.Comm(devices[rank], timeout)
    return ParallelHost(comm, workers, models_dir=models_dir, device=devices[rank], output_dir=output_dir,
                        input_dir=input_dir)


def _worker(index, argv, port):
    from .runner import main
    main(argv, worker=(index + 1, port))


def devices_for(gpus: str, load_device) -> list | None:
    """SanaModelLoader's `gpus`: None for one device ("1" or empty); "N": the DiT's device and the next N - 1
    GPUs; a list ("0,1", "cuda:0,cuda:2", "cpu,cpu" for CPU worker processes) whose first entry is the
    DiT's device."""
    where = f"SanaModelLoader: gpus '{gpus}'"
    spec = gpus.strip().replace(" ", "")
    load_device = torch.device(load_device)
    if spec.isdigit() or not spec:
        count = int(spec or 1)
        if count <= 1:
            return None
        if load_device.type != "cuda":
            raise ValueError(f"{where}: ComfyUI samples on {load_device}, not a GPU; set gpus to 1 (a list such as "
                             f"cpu,cpu starts CPU worker processes, for tests)")
        visible = torch.cuda.device_count()
        if count > visible:
            raise ValueError(f"{where}: {visible} GPU(s) are visible to ComfyUI; set gpus to at most {visible} "
                             f"(check CUDA_VISIBLE_DEVICES and --cuda-device)")
        others = [i for i in range(visible) if i != load_device.index]
        return [load_device] + [torch.device("cuda", i) for i in others[:count - 1]]
    try:
        devices = [parallel.device_of(d) for d in spec.split(",") if d]
    except RuntimeError as e:
        raise ValueError(f"{where}: {e}; give a count (2) or a device list (0,1)") from e
    if devices[0] != load_device:
        raise ValueError(f"{where}: the first device must be the one ComfyUI samples on ({load_device}), e.g. "
                         f"{load_device.index if load_device.type == 'cuda' else load_device.type},...")
    visible = torch.cuda.device_count()
    for d in devices:
        if d.type == "cuda" and d.index >= visible:
            raise ValueError(f"{where}: {d} does not exist ({visible} GPU(s) visible to ComfyUI)")
    return devices if len(devices) > 1 else None


def start_workers(managed, gpus: str, dtype: str) -> None:
    """Starts the worker processes `gpus` names for `managed` (the DiT's ManagedModel, loaded with the loader's
    `dtype` choice): each loads the same file at the same precision. They stop when the model is freed or
    another model starts workers."""
    devices = devices_for(gpus, managed.load_device)
    if devices is None:
        return
    if dtype == sana_core.fp8.FP8_COMPUTE:
        raise ValueError(f"SanaModelLoader: dtype {dtype} is not carried to the worker processes yet: choose auto or "
                         f"bf16 with gpus '{gpus}', or set gpus to 1")
    workers = parallel.Workers(devices, {"path": managed.path, "dtype": managed.model.dtype})
    try:
        workers.start()
    except parallel.ParallelError as e:
        raise RuntimeError(f"SanaModelLoader: gpus '{gpus}': the worker processes did not start: {e}") from e
    managed.workers = workers
    owner = managed.model
    if managed.patcher is not None:  # inside ComfyUI: every sampler's calls, with the MODEL's weight patches
        managed.host.family.share_with_workers(managed.patcher, workers)
        owner = managed.patcher.model
    weakref.finalize(owner, workers.stop)
