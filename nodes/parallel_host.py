"""sana-run --devices 0,1: one workflow on several GPUs (sana_core.parallel).

Every process runs the whole workflow (same files, same seeds) on its device; the SANA DiT calls and VAE
decodes are shared out and their outputs exchanged, so every process holds the same images. Process 0 is
the one started from the command line: it spawns the others and alone shows progress and saves images
(the others save into a temporary folder that is deleted).
"""
import os
import shutil
import tempfile

import torch.distributed as dist
import torch.multiprocessing as mp
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

