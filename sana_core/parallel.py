"""Several processes (GPUs), one image: SANA's DiT sampling and DC-AE decode over torch.distributed
(NCCL between GPUs, gloo between CPU processes).

Every process holds the whole model and runs the same sampling loop on the same inputs (same seed, so
the same noise); only the DiT calls and the decode are shared out, and their outputs all-gathered, so
every process ends each step with the same latent. A DiT call of batch B (samples x CFG/PAG branches)
over P processes follows a Plan of `groups` x `bands` processes, rank = group * bands + band:
- groups: the batch is cut into `groups` near-equal parts (CFG's uncond / cond, PAG's branch, samples),
  one per group of processes: no communication inside the DiT.
- bands: a group cuts the image into `bands` row bands (near-equal; uneven splits are fine). Everything
  in a block is per token except two things, which the Band supplies through the `band` hooks of
  sana_core.transformer: the self-attention is linear, so each band computes its tokens' key-value sums
  (per head relu(K)^T V, D x D, and sum relu(K), D values: kilobytes) and one all-reduce per layer adds
  the other bands' (exact: the same sums, added in another order); the Mix-FFN's 3x3 depthwise conv
  needs the row above and below the band, sent by the neighbouring bands (halo). The 2K/4K position
  embedding is added for the whole image before the band's rows are taken.
choose_plan: the least DiT work per process, batch groups before bands where equal (they need no
per-layer communication); bands only at 2K and above. Ranks a plan leaves out (3 processes, 1024 px, CFG:
two branches) only take part in the output's all-gather.

The decode (`decode`): the DC-AE's stages 3-5 (global attention, at 1/8 of the image size) run on every
process; stages 0-2 and the head (convolutions, most of the work) on one row band per process with
their receptive field of context rows, as autoencoder.decode_tiled does (exact), then one all-gather.

Entry points: SanaPipeline(..., devices=[0, 1]) calls `start`: it spawns one worker process per extra
device (or, under torchrun, joins the processes torchrun started) and wraps the pipeline's transformer
and autoencoder; every process runs the same sampling loop. `Workers` is for a sampling loop that runs in
one process only (ComfyUI's samplers): it starts one worker process per extra device (serve(), loading the
same DiT file) and sends each DiT call's inputs to them. Failures: every collective waits at most `timeout`
seconds (SANA_PARALLEL_TIMEOUT, default 300); a process that dies or stops answering makes the others raise
ParallelError, never hang.
"""
import contextlib
import datetime
import functools
import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from .kernels import depthwise_conv_glu
from .runtime import decode_tile
from .transformer import Caption

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = float(os.environ.get("SANA_PARALLEL_TIMEOUT", 300))  # seconds a collective may wait
START_TIMEOUT = 600  # seconds the processes may take to start and meet
BAND_MIN_HEIGHT = 64  # latent rows (2048 px) from which row bands pay for their communication
GRAPHS_ENV = "SANA_PARALLEL_CUDA_GRAPHS"  # "1": Session steps replayed as CUDA graphs (experimental, NCCL only)
MIN_BAND_ROWS = 16  # latent rows per band at least


class ParallelError(RuntimeError):
    """A collective failed: another process died, ran out of memory or stopped answering."""


class Cancelled(RuntimeError):
    """Another process's step callback stopped the call (Cancel)."""


def split(length: int, parts: int) -> list:
    """[start, end) intervals covering `length` in `parts` near-equal pieces, the longer ones first."""
    size, extra = divmod(length, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + size + (i < extra))
    return list(zip(bounds[:-1], bounds[1:]))


@dataclass(frozen=True)
class Plan:
    """groups x bands processes per DiT call (rank = group * bands + band); ranks beyond wait."""
    groups: int = 1
    bands: int = 1

    def __str__(self):
        return f"{self.groups} batch group(s) x {self.bands} row band(s)"

    def role(self, rank: int):
        """(group, band) of `rank`, or None when the plan leaves it out."""
        return divmod(rank, self.bands) if rank < self.groups * self.bands else None


def choose_plan(world: int, batch: int, height: int) -> Plan:
    """The split of a DiT call of `batch` latents (samples x CFG/PAG branches) of `height` latent rows
    over `world` processes: the least work per process (latents of the largest group share / bands); among
    equals the fewest bands (batch groups need no per-layer communication). Bands only at 2K and above
    (BAND_MIN_HEIGHT), with at least MIN_BAND_ROWS rows each."""
    max_bands = max(1, height // MIN_BAND_ROWS) if height >= BAND_MIN_HEIGHT else 1
    plans = [Plan(g, b) for g in range(1, min(world, batch) + 1) for b in range(1, min(world // g, max_bands) + 1)]
    return min(plans, key=lambda p: (-(-batch // p.groups) / p.bands, p.bands))


class Comm:
    """This process's place among the others (rank, world size, device) and the collectives it takes
    part in, each waiting at most `timeout` seconds; after a failure every later call fails at once
    (the processes no longer agree on where they are: start them again)."""

    def __init__(self, device, timeout: float = DEFAULT_TIMEOUT):
        if not dist.is_initialized():
            raise RuntimeError("no torch.distributed process group: use SanaPipeline(..., devices=[...]) or "
                               "call sana_core.parallel.init() (torchrun) first")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(device)
        self.timeout = datetime.timedelta(seconds=timeout)
        self.failed = None  # the first failure's message
        self.seconds = None  # a benchmark sets 0.0: then the wall time of the collectives adds up here (synchronised)
        self._groups = {}  # ranks -> process group
        self.watch = None  # Workers' leader: raises ParallelError when a worker process died

    def check(self):
        if self.failed:
            raise ParallelError(f"the processes failed earlier ({self.failed}); start them again "
                                f"(a new SanaPipeline(..., devices=...))")

    def group(self, ranks: tuple):
        """The process group of `ranks`; every process must ask for the same groups in the same order."""
        if ranks not in self._groups:
            self._groups[ranks] = dist.new_group(list(ranks), timeout=self.timeout)
        return self._groups[ranks]

    @contextmanager
    def talking(self, what: str):
        """Runs collectives; turns their failures (a dead peer, a timeout) into one clear ParallelError."""
        self.check()
        start = self._clock()
        try:
            yield
            if start is not None:
                self.seconds += self._clock() - start
        except Exception as e:
            if isinstance(e, (ParallelError, Cancelled)) or not isinstance(e, RuntimeError):  # DistError is one
                raise
            self.failed = f"{what} on rank {self.rank} of {self.world}: {type(e).__name__}: {str(e)[:300]}"
            raise ParallelError(f"{self.failed}. Another process died, ran out of memory or did not answer "
                                f"within {self.timeout.total_seconds():.0f} s (SANA_PARALLEL_TIMEOUT); this "
                                f"call's images are lost and the processes must be started again") from e

    def _clock(self):
        if self.seconds is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def wait(self, works, watch=False):
        """Within the process group's timeout (gloo: an error; NCCL: its watchdog). watch: also poll
        `self.watch` (Workers' check of its processes: raises ParallelError for one that died) and time out
        here, for NCCL, whose wait returns before the work is done and whose hang only a host sync would meet."""
        for work in works if isinstance(works, list) else [works]:
            if watch and self.watch is not None:
                deadline = time.monotonic() + self.timeout.total_seconds()
                while not work.is_completed():
                    self.watch()
                    if time.monotonic() > deadline:
                        raise ParallelError(f"no answer within {self.timeout.total_seconds():.0f} s")
                    time.sleep(0.0005)
            work.wait()

    def all_reduce(self, tensor, what, *, op=dist.ReduceOp.SUM, group=None):
        with self.talking(what):
            self.wait(dist.all_reduce(tensor, op=op, group=group, async_op=True))
        return tensor

    def all_gather(self, tensor, what, *, watch=False) -> list:
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        with self.talking(what):
            self.wait(dist.all_gather(parts, tensor.contiguous(), async_op=True), watch)
        return parts

    def broadcast(self, tensor, what, *, group=None):  # rank 0's tensor on every process
        with self.talking(what):
            self.wait(dist.broadcast(tensor, src=0, group=group, async_op=True))
        return tensor


class Band:
    """This process's row band [row0, row1) of a (height x width) latent grid, one of `ranks` (top to
    bottom) in process group `group`: the hooks sana_core.transformer calls while `band` is set."""

    def __init__(self, comm: Comm, rows: tuple, full_height: int, width: int, ranks: tuple):
        self.comm, self.ranks, self.group = comm, ranks, comm.group(ranks)
        self.row0, self.row1 = rows
        self.height, self.width, self.full_height = self.row1 - self.row0, width, full_height
        i = ranks.index(comm.rank)
        self.above = ranks[i - 1] if self.row0 > 0 else None
        self.below = ranks[i + 1] if self.row1 < full_height else None

    def take_rows(self, tokens):  # (B, full_height * width, C) -> (B, height * width, C)
        return tokens[:, self.row0 * self.width:self.row1 * self.width]

    def all_reduce_kv(self, kv, ksum):
        """linear_attention's `reduce`: (B, heads, D, D) and (B, heads, D) float32 sums over this band's
        tokens -> the sums over the whole image (one all-reduce of both)."""
        D = kv.shape[-1]
        both = torch.cat([kv.flatten(2), ksum], dim=2)  # (B, heads, D * D + D)
        self.comm.all_reduce(both, "the self-attention key-value all-reduce", group=self.group)
        return both[..., :D * D].unflatten(-1, (D, D)), both[..., D * D:]

    def depthwise_conv_glu(self, x, weight, bias, height, width):
        """kernels.depthwise_conv_glu on this band: x (B, height * width, 2H), with the row above and the
        row below exchanged with the neighbouring bands (zero padding only at the image's edges)."""
        ops, above, below = [], None, None
        if self.above is not None:
            above = torch.empty_like(x[:, :width]).contiguous()
            ops += [dist.P2POp(dist.isend, x[:, :width].contiguous(), self.above, self.group),
                    dist.P2POp(dist.irecv, above, self.above, self.group)]
        if self.below is not None:
            below = torch.empty_like(x[:, :width]).contiguous()
            ops += [dist.P2POp(dist.isend, x[:, -width:].contiguous(), self.below, self.group),
                    dist.P2POp(dist.irecv, below, self.below, self.group)]
        with self.comm.talking("the Mix-FFN halo-row exchange"):
            self.comm.wait(dist.batch_isend_irecv(ops))
        x = torch.cat([t for t in (above, x, below) if t is not None], dim=1)
        out = depthwise_conv_glu(x, weight, bias, height + (above is not None) + (below is not None), width)
        start = width if above is not None else 0
        return out[:, start:start + height * width]  # (B, height * width, H)


@contextmanager
def banded(model, band):
    """While inside, `model` (a SanaTransformer) computes only `band` (None: the whole image)."""
    hooked = [m for m in model.modules() if hasattr(m, "band")]
    for m in hooked:
        m.band = band
    try:
        yield
    finally:
        for m in hooked:
            m.band = None


def _take(value, b0, b1, batch):
    """The samples [b0, b1) of a per-sample model input (tensors of `batch` rows, Captions); others as they are."""
    if isinstance(value, Caption):
        return Caption(tuple((k[b0:b1], v[b0:b1]) for k, v in value.kv),
                       None if value.keep is None else value.keep[b0:b1])
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
        return value[b0:b1]
    return value


class ParallelTransformer(nn.Module):
    """A SanaTransformer whose calls are shared out over the processes (see the module docstring). Every
    process calls it with the same inputs and gets the whole output. plan: a fixed Plan, or None to
    choose_plan per call."""

    def __init__(self, model, comm: Comm, plan: Plan = None):
        super().__init__()
        self.model, self.comm, self.plan = model, comm, plan
        self.config = model.config
        self.last_plan = None

    @property
    def dtype(self):
        return self.model.dtype

    @property
    def device(self):
        return self.model.device

    def encode_caption(self, context, context_mask=None, *, device=None):
        return self.model.encode_caption(context, context_mask, device=device)

    def clear_device_caches(self):
        self.model.clear_device_caches()

    def forward(self, x, timestep, context, context_mask=None, guidance=None, *, perturbed=None,
                perturbed_layers=(), control=None):
        if control is not None:
            raise NotImplementedError("ControlNets are not carried to parallel sampling yet: sample on one device")
        self.last_plan = self.plan or choose_plan(self.comm.world, x.shape[0], x.shape[2])
        return forward_shared(self.model, self.comm, self.last_plan, x, timestep, context, context_mask, guidance,
                              perturbed, perturbed_layers)


def forward_shared(model, comm: Comm, plan: Plan, x, timestep, context, context_mask=None, guidance=None,
                   perturbed=None, perturbed_layers=(), *, watch=False):
    """model(x, timestep, context, ...) (a SanaTransformer call: x (B, C, H, W), context a Caption) computed by
    every process of `comm` on its part of `plan`, the whole output (B, C_out, H, W) on every process.
    watch: the final all-gather checks the workers' health while it waits (Workers' leader)."""
    B, _, H, W = x.shape
    if plan.groups * plan.bands > comm.world or plan.bands > H:
        raise ValueError(f"{plan} does not fit {comm.world} processes and {H} latent rows")
    shares, bands = split(B, plan.groups), split(H, plan.bands)
    if plan.bands > 1:  # every process makes every band group (new_group is collective)
        with comm.talking("creating the band process groups"):
            for g in range(plan.groups):
                comm.group(tuple(range(g * plan.bands, (g + 1) * plan.bands)))
    role = plan.role(comm.rank)
    out = torch.zeros((-(-B // plan.groups), model.config.out_channels, -(-H // plan.bands), W),
                      dtype=x.dtype, device=x.device)  # this rank's part, padded to the largest
    if role is not None and shares[role[0]][1] > shares[role[0]][0]:
        (b0, b1), g = shares[role[0]], role[0]
        band = Band(comm, bands[role[1]], H, W, tuple(range(g * plan.bands, (g + 1) * plan.bands))) \
            if plan.bands > 1 else None
        take = functools.partial(_take, b0=b0, b1=b1, batch=B)
        with banded(model, band):
            y = model(x[b0:b1], take(timestep), take(context), take(context_mask), take(guidance),
                      perturbed=take(perturbed), perturbed_layers=perturbed_layers)
        r0, r1 = bands[role[1]]
        out[:b1 - b0, :, :r1 - r0] = y
    parts = comm.all_gather(out, "gathering the DiT outputs", watch=watch)
    result = torch.empty((B, model.config.out_channels, H, W), dtype=x.dtype, device=x.device)
    for rank, part in enumerate(parts[:plan.groups * plan.bands]):
        g, b = plan.role(rank)
        (b0, b1), (r0, r1) = shares[g], bands[b]
        result[b0:b1, :, r0:r1] = part[:b1 - b0, :, :r1 - r0]
    return result


@torch.no_grad()
def decode(autoencoder, latent, comm: Comm) -> torch.Tensor:
    """autoencoder.decode(latent) shared out over the processes: scaled latent (B, 32, h, w) -> float32
    images (B, 3, 32h, 32w) in [-1, 1] on every process."""
    from .autoencoder import _finish
    dec = autoencoder.decoder
    x = dec.global_stages(autoencoder._unscale(latent))  # (B, C, H, W): stages 3-5, on every process
    B, _, H, W = x.shape
    f, halo = dec.local_scale, dec.local_halo
    bands = split(H, min(comm.world, H))
    y = None
    if comm.rank < len(bands):
        r0, r1 = bands[comm.rank]
        a0, a1 = max(r0 - halo, 0), min(r1 + halo, H)
        tile = None
        if x.device.type == "cuda":  # the biggest tile that fits, as Runtime.decode chooses it
            per_latent = autoencoder.spatial_compression // f
            free, _ = torch.cuda.mem_get_info(x.device)
            tile = decode_tile(autoencoder, B, -(-(a1 - a0) // per_latent), -(-W // per_latent), free)
        y = dec.local_stages(x[:, :, a0:a1]) if tile is None else autoencoder._local_tiled(x[:, :, a0:a1], tile)
        y = y[:, :, (r0 - a0) * f:(r1 - a0) * f]  # (B, 3, rows * f, W * f)
    rows = -(-H // len(bands)) * f
    part = torch.zeros((B, 3, rows, W * f), dtype=x.dtype, device=x.device)
    if y is not None:
        part[:, :, :y.shape[2]] = y
    parts = comm.all_gather(part, "gathering the decoded bands")
    pixels = torch.cat([p[:, :, :(r1 - r0) * f] for p, (r0, r1) in zip(parts, bands)], dim=2)
    return _finish(pixels)


class ParallelAutoencoder(nn.Module):
    """An autoencoder (DCAE) whose decode and decode_tiled are shared out over the processes (`decode`);
    everything else (encode, decode_tiled, device, dtype, ...) is the wrapped autoencoder's."""

    def __init__(self, autoencoder, comm: Comm):
        super().__init__()
        self.autoencoder, self.comm = autoencoder, comm

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)  # the submodule
        except AttributeError:
            return getattr(self.autoencoder, name)

    def decode(self, latent, *, decoder=None, between=None):  # a Runtime's graphed decoder is not used here
        return decode(self.autoencoder, latent, self.comm)

    def decode_tiled(self, latent, tile=None, overlap=None, between=None):  # the shared decode is banded already
        return decode(self.autoencoder, latent, self.comm)


# ----------------------------------------------------------------------------- processes

def device_of(spec) -> torch.device:
    """0 / "0" / "cuda:0" -> cuda:0; "cpu" -> cpu."""
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        return torch.device("cuda", int(spec))
    return torch.device(spec)


def _init_group(device, rank, world, timeout, port=None, store=None):
    """Joins the process group: torchrun's (port None), or the one whose rank 0 listens on 127.0.0.1:port,
    waiting up to START_TIMEOUT for the others to start (a worker imports torch and loads its models), or
    the one of `store`."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    where = {"store": store} if store is not None else {"init_method": "env://"} if port is None else {
        "store": dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0,
                               timeout=datetime.timedelta(seconds=START_TIMEOUT))}
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout),
                            **where, **({"device_id": device} if device.type == "cuda" else {}))


def init(devices=None, *, timeout: float = DEFAULT_TIMEOUT) -> torch.device:
    """Under torchrun: join the process group its environment describes (NCCL on GPUs, gloo on the CPU)
    and return this process's device: devices[rank] when given, else cuda:LOCAL_RANK (the CPU without
    GPUs). Load the models onto it, then SanaPipeline(..., devices=devices) in every process."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if devices is not None:
        device = device_of(list(devices)[rank])
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
            else torch.device("cpu")
    if not dist.is_initialized():
        _init_group(device, rank, world, timeout)
    return device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Session:
    """The processes of one parallel SanaPipeline. The leader (rank 0 of processes it spawned) sends each
    call to the workers; under torchrun every process makes the same calls itself."""

    def __init__(self, comm: Comm, leader: bool, workers=None):
        self.comm, self.leader, self.workers = comm, leader, workers
        # the calls go out on a CPU group without a timeout: a worker may wait days for the next one
        # (it still learns at once of a leader that died: the connection closes)
        self.calls = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365))

    def broadcast_call(self, call=None):
        """The leader's `call` (its arguments, or None: exit) on every process; a worker waits here."""
        box = [call]
        with self.comm.talking("sending the call to the workers"):
            dist.broadcast_object_list(box, src=0, group=self.calls)
        return box[0]

    def graphs(self) -> bool:
        """Whether the sampling steps may be CUDA graphs: NCCL collectives are captured (gloo's are not), and
        only with SANA_PARALLEL_CUDA_GRAPHS=1 until measured. Every process decides the same way; a step any
        one replays eagerly still runs each collective once, as a replayed graph does."""
        return self.comm.device.type == "cuda" and os.environ.get(GRAPHS_ENV, "0") == "1"

    def begin(self, call: dict, callback):
        """At the start of SanaPipeline.__call__ (`call`: its arguments): the leader sends the call to the
        workers. Returns the step callback every process uses: the caller's, then a stop flag all
        processes agree on, so that a Cancel (the callback raising) stops them all."""
        self.comm.check()
        if self.leader:
            self.broadcast_call({k: v for k, v in call.items() if k not in ("self", "callback")})
        return functools.partial(self._step, callback)

    def _step(self, callback, step, total, x0):
        error = None
        if callback is not None:
            try:
                callback(step, total, x0)
            except BaseException as e:  # noqa: B036 (KeyboardInterrupt and ComfyUI's interrupt included)
                error = e
        stop = torch.tensor([float(error is not None)], device=self.comm.device)
        self.comm.all_reduce(stop, "agreeing on Cancel", op=dist.ReduceOp.MAX)
        if error is not None:
            raise error
        if stop.item():
            raise Cancelled(f"rank {self.comm.rank}: another process stopped the call at step {step}")

    def close(self):
        """The leader tells the workers to exit and waits for them; then leaves the process group."""
        if not dist.is_initialized():
            return
        if self.leader and not self.comm.failed:
            try:
                self.broadcast_call(None)
            except ParallelError:
                pass
        if self.workers is not None:
            self.workers.join(timeout=30)
            for p in self.workers.processes:
                if p.is_alive():
                    p.kill()
        if self.leader:
            dist.destroy_process_group()


def start(pipe, devices, *, plan: Plan = None, timeout: float = DEFAULT_TIMEOUT) -> Session:
    """Spread `pipe` (a SanaPipeline) over `devices` (GPU indices, or "cpu" for gloo CPU processes): join
    the process group when there is one (torchrun, or a worker), else spawn one worker per extra device,
    each with the same components (shared, then copied to its device). Moves this process's components to
    its device and wraps the transformer (ParallelTransformer) and autoencoder (ParallelAutoencoder)."""
    devices = [device_of(d) for d in devices]
    leader, workers = False, None
    if not dist.is_initialized() and "TORCHELASTIC_RUN_ID" in os.environ:
        init(devices, timeout=timeout)
    if dist.is_initialized():
        if dist.get_world_size() != len(devices):
            raise ValueError(f"devices={devices} names {len(devices)} devices, but the process group has "
                             f"{dist.get_world_size()} processes: give one device per process")
        device = devices[dist.get_rank()]
    else:
        device, port = devices[0], _free_port()
        workers = mp.start_processes(_worker, args=(port, [str(d) for d in devices],
                                                    (pipe.transformer, pipe.autoencoder, pipe.text_encoder),
                                                    plan, timeout),
                                     nprocs=len(devices) - 1, join=False, daemon=True, start_method="spawn")
        _init_group(device, 0, len(devices), timeout, port)
        leader = True
    comm = Comm(device, timeout)
    pipe.transformer = ParallelTransformer(pipe.transformer.to(device), comm, plan)
    pipe.autoencoder = ParallelAutoencoder(pipe.autoencoder.to(device), comm)
    pipe.text_encoder = pipe.text_encoder.to(device)
    return Session(comm, leader, workers)


def _worker(index, port, devices, components, plan, timeout):
    """A spawned process (rank index + 1): the same pipeline on its device, making the leader's calls
    until the leader sends None."""
    from .pipeline import SanaPipeline
    rank = index + 1
    device = device_of(devices[rank])
    _init_group(device, rank, len(devices), timeout, port)
    pipe = SanaPipeline(*components, devices=devices, plan=plan, timeout=timeout)
    while True:
        try:
            call = pipe.parallel.broadcast_call()
        except ParallelError as e:
            log.error("SANA worker %d: %s", rank, e)
            break
        if call is None:
            break
        try:
            pipe(**call)
        except ParallelError as e:
            log.error("SANA worker %d: %s", rank, e)
            break
        except Exception as e:  # the leader meets the same error with the same inputs, or a Cancel
            log.info("SANA worker %d: the call ended with %s: %s", rank, type(e).__name__, e)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- workers of one sampling loop

# A worker's program: sana_core (and sana_core.kernels, a folder of its own) imported from the folders this
# process has them from, as the pack's __init__.py does inside ComfyUI, then serve().
_WORKER_MAIN = """import importlib.util, sys
for name, path in (("sana_core.kernels", sys.argv[2]), ("sana_core", sys.argv[1])):
    spec = importlib.util.spec_from_file_location(name, path + "/__init__.py", submodule_search_locations=[path])
    sys.modules[name] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
from sana_core.parallel import serve
serve()
"""
KEPT_CAPTIONS = 4  # captions a worker keeps (a sampling call has one; ComfyUI's loop one per conditioning batch)
_running = None  # the Workers whose process group this process is in
_caption_keys = itertools.count()


class SentCaption(NamedTuple):
    """LeaderTransformer.encode_caption's result: this process's Caption, and what the workers make theirs from."""
    caption: Caption
    context: torch.Tensor  # (B, T, caption_dim)
    mask: torch.Tensor | None  # (B, T)
    key: int


class LeaderTransformer:
    """What a sampling loop calls instead of its SanaTransformer `model` while `workers` share the calls out
    (the same calls: encode_caption, then model(x, timestep, caption, ...) per step). Never a CUDA graph."""

    def __init__(self, model, workers):
        self.model, self.workers = model, workers

    def __getattr__(self, name):  # config, dtype, device, clear_device_caches: the model's
        return getattr(self.model, name)

    def encode_caption(self, context, context_mask=None, *, device=None):
        self.workers.ready(self.model)  # refuses patches it cannot carry before any work
        caption = self.model.encode_caption(context, context_mask, device=device)
        return SentCaption(caption, context, context_mask, next(_caption_keys))

    def __call__(self, x, timestep, context, context_mask=None, guidance=None, *, perturbed=None,
                 perturbed_layers=(), control=None):
        if control is not None:
            raise NotImplementedError("ControlNets are not carried to the worker processes (several devices) yet: "
                                      "sample on one device")
        return self.workers.call(self.model, x, timestep, context, guidance, perturbed, perturbed_layers)


class Workers:
    """Worker processes for a sampling loop that runs in this process alone (ComfyUI's samplers): one process
    per extra device (serve()), each loading the same DiT file (`load`: load_transformer's path, dtype and
    hints) and kept between calls. The loop calls `transformer(model)` instead of its SanaTransformer: each DiT
    call's inputs (the caption once) are broadcast to the workers and every process computes its part as
    ParallelTransformer does (choose_plan per call); this process gets the whole output.

    weights: None, or a callable giving (version, {name: make}) for the weights of this process's model that
    are patched (a LoRA merged by ComfyUI's ModelPatcher: make() gives the patched tensor; it may raise to
    refuse patches the workers cannot apply); when the version changes, the patched weights are sent before
    the next call and the workers restore the others.
    Failures: a worker that died, ran out of memory or did not answer within `timeout` ends the call with a
    ParallelError naming the worker and its last error line; the workers are stopped and the next call starts
    them again. One Workers runs at a time in a process (torch.distributed has one default process group):
    starting one stops the other."""

    def __init__(self, devices, load: dict, *, timeout: float = DEFAULT_TIMEOUT):
        self.devices = [device_of(d) for d in devices]
        self.load, self.timeout = load, timeout
        self.weights = None
        self.procs = []  # (process, log file) per worker, rank 1 first
        self.comm = self.calls = None
        self.sent_weights = None  # the weights version the workers hold
        self.sent_captions = []  # the keys of the captions the workers hold

    def __repr__(self):
        return f"<SANA workers on {', '.join(map(str, self.devices[1:]))}: {'running' if self.comm else 'stopped'}>"

    def transformer(self, model) -> LeaderTransformer:
        return LeaderTransformer(model, self)

    def start(self):
        """Starts the workers and waits until each has loaded the DiT and joined (ParallelError if one fails)."""
        global _running
        if _running is not None and _running is not self:
            log.warning("SANA: stopping %s: one model at a time shares its calls with worker processes", _running)
            _running.stop()
        if dist.is_initialized():
            raise ParallelError("this process is already in a torch.distributed process group (torchrun, sana-run "
                                "--devices or SanaPipeline(devices=...)): it cannot start other workers")
        world, device = len(self.devices), self.devices[0]
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=START_TIMEOUT))
        folders = [os.path.dirname(sys.modules[m].__file__) for m in ("sana_core", "sana_core.kernels")]
        try:
            for rank in range(1, world):
                logfile = tempfile.TemporaryFile(prefix=f"sana-worker-{rank}-")
                proc = subprocess.Popen([sys.executable, "-c", _WORKER_MAIN, *folders], stdin=subprocess.PIPE,
                                        stdout=logfile, stderr=subprocess.STDOUT)
                self.procs.append((proc, logfile))
                proc.stdin.write(pickle.dumps({"rank": rank, "world": world, "port": store.port, "load": self.load,
                                               "device": str(self.devices[rank]), "timeout": self.timeout}))
                proc.stdin.close()
            deadline = time.monotonic() + START_TIMEOUT
            while not store.check([f"sana/ready/{rank}" for rank in range(1, world)]):
                self.check()
                if time.monotonic() > deadline:
                    raise ParallelError(f"the workers did not load the DiT within {START_TIMEOUT} s")
                time.sleep(0.05)
            if device.type == "cuda":  # no watchdog that ends this process: check() and the timeouts end a call
                os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
            _init_group(device, 0, world, self.timeout, store=store)
            self.comm = Comm(device, self.timeout)
            self.comm.watch = self.check
            self.calls = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365))  # idle workers wait
        except BaseException:
            self.stop()
            raise
        _running = self
        log.info("SANA: %d worker process(es) on %s ready", world - 1, ", ".join(map(str, self.devices[1:])))

    def check(self):
        """ParallelError naming the first worker that is no longer running, with its last error line."""
        for rank, (proc, logfile) in enumerate(self.procs, 1):
            code = proc.poll()
            if code is not None:
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                logfile.seek(0)
                lines = [line for line in logfile.read().decode(errors="replace").splitlines() if line.strip()]
                last = f": {lines[-1].strip()[:500]}" if lines and code > 0 else ""  # its error
                raise ParallelError(f"the SANA worker process on {self.devices[rank]} (rank {rank}) {how}{last}")

    def stop(self):
        """Tells the workers to exit (kills those that do not) and leaves the process group."""
        global _running
        healthy = self.comm is not None and not self.comm.failed
        if healthy:
            try:
                self.check()
                self._send(None)
            except ParallelError:
                healthy = False
        for proc, logfile in self.procs:
            try:
                proc.wait(timeout=10 if healthy else 0.1)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            logfile.close()
        if self.comm is not None and dist.is_initialized():
            with contextlib.suppress(Exception):
                if not healthy and self.comm.device.type == "cuda":  # NCCL work may wait on a dead worker
                    dist.distributed_c10d._abort_process_group()
                else:
                    dist.destroy_process_group()
        self.procs, self.comm, self.calls, self.sent_weights, self.sent_captions = [], None, None, None, []
        if _running is self:
            _running = None

    def _send(self, call):
        """`call` (a dict, or None: exit) to every worker."""
        with self.comm.talking("sending the call to the workers"):
            dist.broadcast_object_list([call], src=0, group=self.calls)

    def ready(self, model):
        """The workers running (started again if one died between calls: nothing is lost) and holding
        `model`'s patched weights: before a sampling run's caption, and before each call."""
        version, patched = (None, {}) if self.weights is None else self.weights()  # a refusal stops nothing
        if self.comm is not None:
            try:
                self.check()
            except ParallelError as e:
                log.warning("SANA: %s; starting the workers again", e)
                self.stop()
        with self._failing():
            if self.comm is None:
                self.start()
            if version != self.sent_weights:
                self._send_weights(model, version, patched)

    def call(self, model, x, timestep, caption: SentCaption, guidance, perturbed, layers) -> torch.Tensor:
        """model(x, timestep, caption, ...) shared out over this process and the workers."""
        self.ready(model)
        comm = self.comm
        with self._failing():
            plan = choose_plan(comm.world, x.shape[0], x.shape[2])
            new = caption.key not in self.sent_captions
            tensors = [x, timestep, guidance, perturbed] + ([caption.context, caption.mask] if new else [None, None])
            tensors = [None if t is None else t.to(comm.device).contiguous() for t in tensors]
            self._send({"op": "dit", "inputs": [None if t is None else (t.shape, t.dtype) for t in tensors],
                        "caption": caption.key, "plan": plan, "layers": tuple(layers)})
            for t in tensors:
                if t is not None:
                    comm.broadcast(t, "sending the DiT inputs")
            self.sent_captions = ([caption.key] + self.sent_captions)[:KEPT_CAPTIONS] if new else self.sent_captions
            return forward_shared(model, comm, plan, tensors[0], tensors[1], caption.caption, None, tensors[2],
                                  tensors[3], layers, watch=True)

    @contextmanager
    def _failing(self):
        """A failure inside stops the workers (they may be inside a collective); the next call starts them.
        A ParallelError says which worker failed and how, when one did."""
        try:
            yield
        except ParallelError as e:
            cause = self._dead_worker(wait=2.0)
            self.stop()
            raise ParallelError(f"{cause or e}. This sampling is lost; the workers start again for the next "
                                f"one") from e
        except BaseException:
            self.stop()
            raise

    def _dead_worker(self, wait: float) -> str | None:
        """check()'s message once a worker has exited (within `wait` seconds: a worker that failed needs a
        moment to write its error and exit), else None."""
        deadline = time.monotonic() + wait
        while True:
            try:
                self.check()
            except ParallelError as e:
                return str(e)
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def _send_weights(self, model, version, patched):
        """The patched weights ({name: make}) to the workers, which restore the others."""
        names = sorted(patched)
        params = dict(model.named_parameters())
        self._send({"op": "weights", "weights": [(n, params[n].shape, params[n].dtype) for n in names]})
        for name in names:
            tensor = patched[name]().to(self.comm.device, params[name].dtype).contiguous()
            self.comm.broadcast(tensor, f"sending the patched weight {name}")
        self.sent_weights, self.sent_captions = version, []


def serve():
    """A Workers process: reads its arguments (pickled) from stdin, loads the DiT on its device, joins the
    leader's process group and computes its part of each call until the leader sends None. Any error ends
    the process (its last line on stderr says why); the leader finds out and starts the workers again."""
    args = pickle.load(sys.stdin.buffer)
    rank, world, device, timeout = args["rank"], args["world"], torch.device(args["device"]), args["timeout"]
    logging.basicConfig(level=logging.INFO, format=f"SANA worker {rank} ({device}): %(message)s")
    if device.type == "cpu":  # CPU processes (tests) share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    store = dist.TCPStore("127.0.0.1", args["port"], world, is_master=False,
                          timeout=datetime.timedelta(seconds=START_TIMEOUT))
    from .transformer import load_transformer
    model = load_transformer(**args["load"], device=device).eval()
    store.set(f"sana/ready/{rank}", "1")
    _init_group(device, rank, world, timeout, store=store)
    comm = Comm(device, timeout)
    calls = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365))
    params, originals, captions = dict(model.named_parameters()), {}, {}
    with torch.no_grad():
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=calls)
            call = box[0]
            if call is None:
                break
            if call["op"] == "weights":  # the leader's patched weights; the others back to the file's
                patched = {name for name, *_ in call["weights"]}
                for name in set(originals) - patched:
                    params[name].copy_(originals.pop(name))
                for name, shape, dtype in call["weights"]:
                    tensor = comm.broadcast(torch.empty(shape, dtype=dtype, device=device), "receiving weights")
                    originals.setdefault(name, params[name].to("cpu", copy=True))
                    params[name].copy_(tensor)
                captions = {}  # made with the old weights; the leader sends the next call's caption again
                continue
            x, timestep, guidance, perturbed, context, mask = [
                None if meta is None else comm.broadcast(torch.empty(meta[0], dtype=meta[1], device=device),
                                                         "receiving the DiT inputs") for meta in call["inputs"]]
            if context is not None:
                captions[call["caption"]] = model.encode_caption(context, mask, device=device)
                captions = dict(list(captions.items())[-KEPT_CAPTIONS:])
            forward_shared(model, comm, call["plan"], x, timestep, captions[call["caption"]], None, guidance,
                           perturbed, call["layers"])
    dist.destroy_process_group()
