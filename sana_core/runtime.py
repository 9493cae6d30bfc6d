"""The runtime: everything SANA's models need from the machine, in one object the caller holds.

A `Runtime` owns the CUDA graphs (the sampling step, Gemma's layers, small decodes, each replayed as one
graph, so that a 20-step sample has no per-layer launch gaps) and the memory decisions (decode untiled or
in tiles, Gemma off the GPU while sampling, the graphs' pool given back before a big decode). The models
(SanaTransformer, TextEncoder, DCAE) hold model code only: their plain calls never capture a graph.
SanaPipeline and the nodes' hosts each hold a Runtime and pass it where it acts:

    runtime = Runtime()                                    # cuda_graphs=None: SANA_CUDA_GRAPHS decides
    latent = sample_latents(dit, ..., runtime=runtime)     # each step (the whole guided call) one graph
    emb, mask = runtime.encode_text(text_encoder, prompts) # Gemma's layers: one graph per length and batch;
                                                           # the instruction's keys/values computed once
    pixels = runtime.decode(autoencoder, latent)           # untiled / tiled by free memory; small: a graph
    latent = runtime.encode(autoencoder, pixels)           # untiled / tiled by free memory
    step = runtime.graphed(fn, constants, module=m, key=..., tokens=n)  # any other pure call
    runtime.release()                                      # drop every graph and give its memory back

Low VRAM (Runtime(max_vram=...), SanaPipeline(max_vram=...), sana-run --max-vram): the models' weights live
in pinned CPU memory and `place(model, device, reserve=...)` puts them on the GPU for their next use, within
max_vram beside the models placed before (those least recently placed are offloaded only when not even
streaming fits): whole when they fit, else block by block: the DiT's blocks (Gemma's layers) that fit stay on
the GPU, the others are copied in while the model runs, the next one prefetched on a side stream while the
current one computes (quantized weights travel quantized), and dropped after use (Placement). `offload(model)`
returns a model to its CPU copies (Gemma after encoding). Decodes tile to fit what is left.

When a call is captured: the first call of a key (module, caller's key, shapes) with given weights runs
eagerly, as the warm-up (lazy initialisation, cuDNN plans, Triton compiles; host syncs detected); the next
one, in this or a later GraphedStep, is captured and replayed. A sampling step is captured at its second
step; a decode or an encode at its second call with that size, so an image size used once costs no capture.

What a graph holds and when it is dropped:
- A graph replays fixed device addresses: its static inputs (copied in at every call), its constants
  (copied in once per GraphedStep, i.e. once per sampling call: the caption's k/v, masks, scales) and
  the module's weights and buffers. The weights are named by `fingerprint(module)` (device, dtype, shape
  and address of every parameter and buffer), taken once per GraphedStep: when it differs from the one a
  cached graph was captured with (weights offloaded and reloaded, partially too; cast to another dtype;
  tensors swapped, as ComfyUI's ModelPatcher does when it patches a weight), that module's graphs are
  dropped and the step is captured again.
- The cache keeps at most MAX_GRAPHS graphs (least recently used dropped first), all sharing one memory
  pool per device (they never run at the same time), and is emptied before a capture when free device
  memory is under MIN_FREE_BYTES.
- Eager instead (reason in `GraphedStep.reason`): graphs switched off (SANA_CUDA_GRAPHS=0 or
  Runtime(cuda_graphs=False)), inputs not on a CUDA device, weights not all on the inputs' device (a
  partially loaded model), layers that patch their weights on the fly (ComfyUI's low-VRAM weight
  functions), calls larger than `max_tokens` (DiT steps: MAX_TOKENS latent tokens; compute-bound beyond,
  launch gaps are under 1% there, and the graph's memory pool would be gigabytes), autograd on, already
  inside a capture, a step that synchronises with the host (.item(), a pageable copy: seen in the warm-up,
  before any capture), or an earlier capture of this runtime that raised.
"""
import contextlib
import itertools
import logging
import os
import warnings
import weakref
from collections import OrderedDict

import torch

from . import resolution
from .text_encoder import instruction_text

log = logging.getLogger(__name__)

MAX_GRAPHS = 8  # cached graphs (an image needs up to 4: 2 Gemma lengths, the step, the decode); LRU dropped first
MAX_WARM = 64  # keys remembered as warmed up (captured at their next call); LRU dropped first
MAX_TOKENS = 8192  # latent tokens per DiT call (batch x CFG/PAG groups x h x w), e.g. 2048 px with CFG at batch 1
GEMMA_MAX_TOKENS = 8192  # prompt tokens per call (batch x length) up to which Gemma runs as a CUDA graph
DECODE_MAX_PIXELS = 1024  # latent pixels (batch x h x w: 1024 px images) up to which a decode replays a graph
MIN_FREE_BYTES = 2 << 30  # free device memory under which every cached graph is dropped before a capture
DECODE_BYTES_PER_PIXEL = 26 * 2**30 / 4096**2  # untiled bf16 DC-AE decode: 26 GiB at 4096 px (measured)
DECODE_TILES = (2048, 1536, 1024, 768, 512, 384, 256)  # tile sides (pixels) a decode or encode short of memory tries
MAX_TEXT_ENTRIES = 8  # cached instruction prefixes (~20 MB each for Gemma-2-2B in bf16) and negative captions
ENV = "SANA_CUDA_GRAPHS"  # "0" / "false" / "off": never capture


def enabled_by_env() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def fingerprint(module) -> tuple:
    """(device, dtype, shape, address) of every parameter and buffer of `module`: what a captured graph
    reads. Any move, cast or swap of a weight gives a different fingerprint."""
    return tuple((t.device, t.dtype, tuple(t.shape), t.data_ptr())
                 for t in itertools.chain(module.parameters(), module.buffers()))


def _map(fn, obj):
    """fn applied to every tensor in nested tuples/lists/NamedTuples (anything else kept)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map(fn, o) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(fn, o) for o in obj)
    return obj


def _tensors(obj) -> list:
    found = []
    _map(found.append, obj)
    return found


def signature(obj) -> tuple:
    """Shapes, dtypes, devices and nesting of the tensors in `obj`: equal signatures fit one graph."""
    if isinstance(obj, torch.Tensor):
        return ("T", tuple(obj.shape), obj.dtype, obj.device)
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__,) + tuple(signature(o) for o in obj)
    return ("V", obj)


def free_bytes(device) -> int:
    """Device memory a new allocation can get: free on the device plus what PyTorch holds unused (the
    cached graphs' pool included: see Runtime.held_bytes), within a set_per_process_memory_fraction cap."""
    free, total = torch.cuda.mem_get_info(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(device)
    return min(free + torch.cuda.memory_reserved(device), int(fraction * total)) - torch.cuda.memory_allocated(device)


def _warm_up(fn, inputs, constants):
    """(fn(*inputs, *constants), description of the first host synchronisation it made or ""). Checked
    before capturing: a sync inside a capture invalidates it, and a capture that raises leaves PyTorch's
    allocator and RNG capture state half-open."""
    if not inputs[0].is_cuda:
        return fn(*inputs, *constants), ""
    mode = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn(*inputs, *constants)
        finally:
            torch.cuda.set_sync_debug_mode(mode)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    return out, syncs[0][:200] if syncs else ""


class CapturedCall:
    """One captured call fn(*inputs, *constants) with its static inputs, constants and output."""

    def __init__(self, fn, inputs, constants, pool):
        self.inputs = [t.clone() for t in inputs]  # allocated outside the graph's pool
        self.constants = _map(torch.clone, constants)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn(*self.inputs, *self.constants)

    def load_constants(self, constants) -> None:
        for static, value in zip(_tensors(self.constants), _tensors(constants)):
            static.copy_(value)

    def __call__(self, inputs):
        for static, value in zip(self.inputs, inputs):
            static.copy_(value)
        self.graph.replay()
        return _map(torch.clone, self.output)  # the next replay (of any graph in the pool) overwrites it


class GraphCache:
    """LRU of captured calls, keyed by (module, caller's key, input and constant signatures); each entry
    remembers the module fingerprint it was captured with."""

    def __init__(self, max_graphs: int = MAX_GRAPHS):
        self.max_graphs = max_graphs
        self.entries = OrderedDict()  # key -> (weakref to module, fingerprint, captured call)
        self.warm = OrderedDict()  # key -> (weakref to module, fingerprint) of a call that ran eagerly once
        self.pools = {}  # device -> memory pool shared by this cache's graphs
        self.pool_bytes = {}  # device -> device memory reserved while capturing (an estimate of the pools)

    def __len__(self):
        return len(self.entries)

    def get(self, key, module, fp):
        """The captured call for `key` when it was captured with the weights `fp`, else None (and
        every graph of `module` captured with other weights is dropped: their addresses are stale)."""
        self._drop_dead()
        entry = self.entries.get(key)
        if entry is not None and entry[1] == fp:
            self.entries.move_to_end(key)
            return entry[2]
        self.drop_stale(module, fp)
        return None

    def add(self, key, module, fp, make, device):
        """Capture with make(pool) and keep it, making room first (LRU bound; all dropped when free
        device memory is short)."""
        self.drop_stale(module, fp)
        if device.type == "cuda" and free_bytes(device) < MIN_FREE_BYTES and self.entries:
            log.info("CUDA graphs: free memory is short, dropping %d cached graph(s)", len(self.entries))
            self.clear()
            torch.cuda.empty_cache()
        while len(self.entries) >= max(self.max_graphs, 1):
            self.entries.popitem(last=False)
        if not self.entries:
            self.pools.pop(device, None)
            self.pool_bytes.pop(device, None)
        if device.type == "cuda" and device not in self.pools:
            self.pools[device] = torch.cuda.graph_pool_handle()
        reserved = 0
        if device.type == "cuda":  # torch.cuda.graph empties the allocator's cache on entry: measure from there
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            reserved = torch.cuda.memory_reserved(device)
        captured = make(self.pools.get(device))
        if device.type == "cuda":
            self.pool_bytes[device] = self.pool_bytes.get(device, 0) + torch.cuda.memory_reserved(device) - reserved
        self.entries[key] = (weakref.ref(module), fp, captured)
        return captured

    def warmed(self, key, module, fp) -> bool:
        """Whether a call of `key` already ran eagerly with these weights (so it can be captured now)."""
        ref, warm_fp = self.warm.get(key, (None, None))
        return ref is not None and ref() is module and warm_fp == fp

    def mark_warm(self, key, module, fp) -> None:
        self.warm[key] = (weakref.ref(module), fp)
        self.warm.move_to_end(key)
        while len(self.warm) > MAX_WARM:
            self.warm.popitem(last=False)

    def drop_stale(self, module, fp) -> None:
        for key in [k for k, (ref, f, _) in self.entries.items() if ref() is module and f != fp]:
            del self.entries[key]

    def _drop_dead(self) -> None:
        for key in [k for k, (ref, _, _) in self.entries.items() if ref() is None]:
            del self.entries[key]

    def clear(self) -> None:
        self.entries.clear()
        self.pools.clear()
        self.pool_bytes.clear()


class GraphedStep:
    """step(*inputs) = fn(*inputs, *constants), replayed from one of `runtime`'s CUDA graphs when possible
    (made by Runtime.graphed).

    fn must be a pure function of its tensor arguments (no host synchronisation, no data-dependent
    Python branching) that reads `module`'s weights; `constants` (nested tuples of tensors) stay the same
    for the life of this GraphedStep (one sampling call); `key` names what else the captured work
    depends on (guidance layout, perturbed layers, ...). tokens: the call's size; above max_tokens it
    runs eagerly."""

    def __init__(self, runtime, fn, constants, *, module, key, tokens: int, max_tokens: int = MAX_TOKENS):
        self.runtime, self.cache = runtime, runtime.cache
        self.fn, self.constants, self.module = fn, constants, module
        self.key, self.tokens, self.max_tokens = key, tokens, max_tokens
        self.enabled = runtime.graphs_enabled()
        self.fingerprint = fingerprint(module) if self.enabled else None  # once per sampling call
        self.captured = None  # the graph this step replays, once found or captured
        self.reason = None  # why it runs eagerly, once decided
        self.captures = 0  # graphs captured by this step (0 or 1)
        self.warm_ups = 0  # eager warm-ups that synchronised with the host

    def __call__(self, *inputs):
        if self.captured is not None:
            return self.captured(inputs)
        if self.reason is None:
            self.reason = self._why_eager(inputs)
        if self.reason:
            return self.fn(*inputs, *self.constants)
        key = (id(self.module), self.key, signature(inputs), signature(self.constants))
        captured = self.cache.get(key, self.module, self.fingerprint)
        if captured is not None:
            captured.load_constants(self.constants)
            self.captured = captured
            return captured(inputs)
        if not self.cache.warmed(key, self.module, self.fingerprint):  # first call: eager
            out, synced = _warm_up(self.fn, inputs, self.constants)  # lazy init, kernel compiles
            if not synced:
                self.cache.mark_warm(key, self.module, self.fingerprint)
            else:  # a host sync would break the capture (and leave PyTorch's capture state inconsistent)
                self.warm_ups += 1
                if self.warm_ups >= 2:  # not just a first-call cache fill: never capturable
                    self.reason = f"the step synchronises with the host ({synced})"
                    log.warning("CUDA graphs: %s; sampling continues without graphs", self.reason)
            return out
        device = inputs[0].device
        capture = self.runtime.capture
        try:
            self.captured = self.cache.add(key, self.module, self.fingerprint,
                                           lambda pool: capture(self.fn, inputs, self.constants, pool), device)
            self.captures += 1
        except Exception as e:  # a capture that failed half way: stop capturing in this runtime
            self.runtime.broken = self.reason = f"capture failed ({type(e).__name__}: {str(e)[:200]})"
            log.error("CUDA graphs: %s; graphs are off for the rest of this process", self.reason)
            pool = self.cache.pools.get(device)
            self.cache.clear()
            with contextlib.suppress(Exception):  # what torch's capture_end skips when it raises
                torch._C._cuda_endAllocateToPool(device.index or 0, pool)
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(device)
            return self.fn(*inputs, *self.constants)
        return self.captured(inputs)

    def _why_eager(self, inputs) -> str:
        if not self.enabled:
            return f"CUDA graphs are off ({ENV}=0 or Runtime(cuda_graphs=False))"
        if self.tokens > self.max_tokens:
            return f"{self.tokens} tokens per call > {self.max_tokens}: compute-bound, launch gaps are negligible"
        if self.runtime.broken:
            return f"an earlier {self.runtime.broken}"
        if any(getattr(m, "weight_function", None) or getattr(m, "bias_function", None) for m in self.module.modules()):
            return "layers patch their weights on the fly (low-VRAM weight patches)"
        device = inputs[0].device
        if device.type != "cuda" or not all(t.device == device for t in _tensors((inputs, self.constants))):
            return f"inputs on {device}, not all on one CUDA device"
        if any(d != device for d, *_ in self.fingerprint):
            return f"the model's weights are not all on {device} (partially loaded or offloaded)"
        if torch.is_grad_enabled():
            return "autograd is on (sampling runs under torch.no_grad())"
        if torch.cuda.is_current_stream_capturing():
            return "already inside a CUDA graph capture"
        return ""


class TextCache:
    """What text encoding computes once per text encoder and reuses: values keyed by (the model, its
    fingerprint: weights, dtype and device, the caller's key), at most MAX_TEXT_ENTRIES (LRU dropped first)."""

    def __init__(self, fingerprint_of=fingerprint):
        self.entries = OrderedDict()  # (id(model), key) -> (weakref to model, fingerprint, value)
        self.fingerprint_of = fingerprint_of

    def get(self, model, key, make):
        """The value kept for `key` with `model`'s current weights, else make() (kept)."""
        fp, key = self.fingerprint_of(model), (id(model), key)
        ref, kept_fp, value = self.entries.get(key, (None, None, None))
        if ref is not None and ref() is model and kept_fp == fp:
            self.entries.move_to_end(key)
            return value
        value = make()
        self.entries[key] = (weakref.ref(model), fp, value)
        while len(self.entries) > MAX_TEXT_ENTRIES:
            self.entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self.entries.clear()


# ----------------------------------------------------------------------------- low VRAM

GiB = 2**30
PLACE_SLACK = GiB // 2  # kept free beyond the estimates: cuBLAS / cuDNN workspaces, allocator fragmentation
TEXT_RESERVE = GiB // 4  # Gemma's activations for a few 300-token prompts


def vram_bytes(value) -> int | None:
    """A max_vram setting in bytes: None (no cap), a number of GiB (up to 1024, e.g. 7 or 7.5) or of bytes
    (above), or a string such as "7", "7GiB", "7.5G", "6000MiB"."""
    if value is None:
        return None
    if isinstance(value, str):
        number = value.strip().lower().removesuffix("b").removesuffix("i")
        unit = {"g": 2**30, "m": 2**20}.get(number[-1:], None)
        try:
            amount = float(number[:-1] if unit else number)
        except ValueError:
            raise ValueError(f"max_vram {value!r}: give a number of GiB (e.g. 7 or '7GiB') or '6000MiB'") from None
        value = amount * unit if unit else amount
    if value <= 0:
        raise ValueError(f"max_vram must be positive, got {value!r}")
    return int(value * GiB) if value <= 1024 else int(value)


def parts(model) -> tuple[torch.nn.Module, torch.nn.ModuleList | None]:
    """(the module holding `model`'s device weights, its blocks that can stream one by one or None): the DiT's
    `blocks`; a TextEncoder's `on_device` and Gemma's decoder layers; anything else (the DC-AE) whole."""
    if isinstance(getattr(model, "on_device", None), torch.nn.Module):  # TextEncoder
        return model.on_device, getattr(model.model, "layers", None)
    return model, getattr(model, "blocks", None)


def _tensors_of(module) -> list:
    return list(itertools.chain(module.parameters(), module.buffers()))


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def resident_blocks(fixed: int, block_bytes: list, budget: int) -> int | None:
    """How many leading blocks stay on the device when `budget` bytes hold the model's `fixed` part, those
    blocks and two streamed ones (the running block and the prefetched next); None when not even the fixed part
    and two blocks fit. All of them when everything fits."""
    if fixed + sum(block_bytes) <= budget:
        return len(block_bytes)
    room = budget - fixed - 2 * max(block_bytes, default=0)
    if room < 0:
        return None
    used, count = 0, 0
    for size in block_bytes:
        if used + size > room:
            break
        used, count = used + size, count + 1
    return count


class Placement:
    """One model's weights placed for computing on `device`: every tensor outside `blocks` and the first
    `resident` blocks on the device; the other blocks' tensors at home (CPU copies, pinned when CUDA is there),
    each copied to the device by a forward pre-hook (on a side stream, started while the block before it
    computes) and dropped by a forward hook. At most two streamed blocks are on the device at a time.
    rest() puts every tensor back at home (the device copies are dropped: the weights must not change while
    placed; offload before merging a LoRA)."""

    def __init__(self, module, blocks):
        self.module, self.blocks = module, blocks if blocks is not None else torch.nn.ModuleList()
        self.tensors = _tensors_of(module)
        pin = torch.cuda.is_available()
        for t in self.tensors:  # the home copies: made once, reused by every placement
            home = t.data.cpu()
            t.data = home.pin_memory() if pin and not home.is_pinned() else home
        self.home = {id(t): t.data for t in self.tensors}  # id(tensor) -> its CPU copy
        self.device, self.resident, self.hooks, self.side = None, len(self.blocks), [], None
        self.loaded = {}  # streamed block index -> (device tensors, copy-done event or None)
        self.inside = set()  # streamed blocks whose own call is running
        self.block_tensors = [_tensors_of(b) for b in self.blocks]
        self.bytes = _nbytes(self.home.values())
        self.block_bytes = [_nbytes(ts) for ts in self.block_tensors]

    def apply(self, device, resident: int) -> None:
        self.rest()
        self.device, self.resident = torch.device(device), resident
        streamed = {id(t) for ts in self.block_tensors[resident:] for t in ts}
        for t in self.tensors:
            if id(t) not in streamed:
                t.data = self.home[id(t)].to(self.device, non_blocking=True)
        self.side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        for i in range(resident, len(self.blocks)):
            self.hooks += [self.blocks[i].register_forward_pre_hook(lambda m, a, i=i: self._enter(i)),
                           self.blocks[i].register_forward_hook(lambda m, a, o, i=i: self._leave(i))]
            for part in self.blocks[i].modules():  # a layer called on its own (the caption's k/v once per sample)
                own = [t for t in itertools.chain(part._parameters.values(), part._buffers.values()) if t is not None]
                if part is not self.blocks[i] and own:
                    self.hooks += [part.register_forward_pre_hook(lambda m, a, i=i, own=own: self._lend(i, own)),
                                   part.register_forward_hook(lambda m, a, o, i=i, own=own: self._take_back(i, own))]

    def device_bytes(self) -> int:
        """Bytes this placement keeps on the device between calls."""
        if self.device is None:
            return 0
        return self.bytes - sum(self.block_bytes[self.resident:])

    def _fetch(self, i) -> None:
        homes = [self.home[id(t)] for t in self.block_tensors[i]]
        copies = [torch.empty_like(h, device=self.device) for h in homes]  # the compute stream's memory
        if self.side is None:
            for c, h in zip(copies, homes):
                c.copy_(h)
            self.loaded[i] = (copies, None)
            return
        self.side.wait_stream(torch.cuda.current_stream(self.device))  # the memory's last reader is done first
        with torch.cuda.stream(self.side):
            for c, h in zip(copies, homes):
                c.copy_(h, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.side)
        self.loaded[i] = (copies, done)

    def _enter(self, i) -> None:
        if i not in self.loaded:
            self._fetch(i)
        copies, done = self.loaded[i]
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
        for t, c in zip(self.block_tensors[i], copies):
            t.data = c
        self.inside.add(i)
        following = i + 1 if i + 1 < len(self.blocks) else self.resident  # the next call starts over
        if following != i and following not in self.loaded:
            self._fetch(following)

    def _lend(self, i, own) -> None:
        """A layer of streamed block i called outside the block's call: its own tensors, for this call only."""
        if i not in self.inside:
            for t in own:
                t.data = self.home[id(t)].to(self.device, non_blocking=True)

    def _take_back(self, i, own) -> None:
        if i not in self.inside:
            for t in own:
                t.data = self.home[id(t)]

    def _leave(self, i) -> None:
        self.inside.discard(i)
        if self.loaded.pop(i, None) is not None:
            for t in self.block_tensors[i]:
                t.data = self.home[id(t)]

    def rest(self) -> None:
        if self.loaded and self.side is not None:
            self.side.synchronize()  # a prefetch still copying into memory that is about to be freed
        for hook in self.hooks:
            hook.remove()
        self.hooks, self.loaded, self.device, self.inside = [], {}, None, set()
        for t in self.tensors:
            t.data = self.home[id(t)]


class Runtime:
    """CUDA graphs and memory decisions for SANA's models (see the module docstring). One per pipeline
    or host; it holds no model, only graphs keyed by the modules they were captured from.

    cuda_graphs: True / False, or None for the environment (SANA_CUDA_GRAPHS, read at each call)."""
    capture = CapturedCall  # what records a graph (tests replace it with a CPU stand-in)

    def __init__(self, *, cuda_graphs: bool | None = None, max_graphs: int = MAX_GRAPHS, max_vram=None):
        self.cuda_graphs = cuda_graphs
        self.cache = GraphCache(max_graphs)
        self.broken = ""  # why capturing stopped (a capture that raised half way), or ""
        self.text_cache = TextCache(self.weights_fingerprint)
        self.max_vram = vram_bytes(max_vram)  # bytes the placed models and their work may use; None: no cap
        self.placements = OrderedDict()  # id(module) -> Placement, least recently placed first

    def graphs_enabled(self) -> bool:
        return enabled_by_env() if self.cuda_graphs is None else self.cuda_graphs

    def graphed(self, fn, constants, *, module, key, tokens: int, max_tokens: int = MAX_TOKENS) -> GraphedStep:
        """fn(*inputs, *constants) as a callable of the inputs, replayed from a graph when possible."""
        return GraphedStep(self, fn, constants, module=module, key=key, tokens=tokens, max_tokens=max_tokens)

    def release(self) -> None:
        """Drop every cached graph and return its memory to the device (before a big decode, when weights
        are unloaded)."""
        had = len(self.cache)
        self.cache.clear()
        self.text_cache.clear()
        if had and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def held_bytes(self, device) -> int:
        """Device memory the cached graphs' pool holds on `device` ("cuda" is the current one; estimated
        at capture; 0 when none). Allocators count it as free, but only graph replays can use it."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return self.cache.pool_bytes.get(device, 0) if len(self.cache) else 0

    # -- low VRAM: where the weights are --------------------------------------------------------------

    def available(self, device) -> int:
        """Bytes a new allocation on `device` can take: free_bytes (the cached graphs' pool counted as free, as
        there), within max_vram (on the CPU: max_vram less what is placed there; no cap: unbounded)."""
        device = torch.device(device)
        if device.type != "cuda":
            if self.max_vram is None:
                return 1 << 62
            return self.max_vram - sum(p.device_bytes() for p in self.placements.values() if p.device == device)
        free = free_bytes(device)
        if self.max_vram is not None:
            free = min(free, self.max_vram - torch.cuda.memory_allocated(device))
        return free

    def place(self, model, device, *, reserve: int = 0) -> Placement:
        """Put `model`'s weights (a SanaTransformer, TextEncoder or DCAE) on `device` for its next use, leaving
        `reserve` bytes for its activations, within max_vram, beside the models placed before: whole when it
        fits, else with its blocks streamed (the leading ones that fit stay); the others are offloaded (least
        recently placed first) only when not even that fits. Raises MemoryError when it does not fit alone."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        module, blocks = parts(model)
        p = self.placements.pop(id(module), None) or Placement(module, blocks)
        self.placements[id(module)] = p
        fixed = p.bytes - sum(p.block_bytes)
        slack = PLACE_SLACK if self.max_vram and device.type == "cuda" else 0

        def plan():
            mine = p.device_bytes() if p.device == device else 0
            budget = self.available(device) - self.held_bytes(device) + mine - reserve - slack
            return resident_blocks(fixed, p.block_bytes, budget), budget
        resident, budget = plan()
        while resident is None and self._offload_oldest(device, keep=p):
            resident, budget = plan()
        if resident is None:
            streamed = fixed + 2 * max(p.block_bytes, default=0)
            raise MemoryError(
                f"max_vram {self.max_vram / GiB:.2f} GiB is too small for the {type(model).__name__}: it needs "
                f"{streamed / GiB:.2f} GiB of weights on the GPU even with its blocks streamed one by one, plus "
                f"{(reserve + slack) / GiB:.2f} GiB for its activations and workspace; "
                f"{(budget + reserve + slack) / GiB:.2f} GiB are available. Raise max_vram, lower the "
                f"image size or batch size, or use a quantized (fp8, GGUF Q8_0/Q4_0) model file")
        if p.device != device or p.resident != resident:
            p.apply(device, resident)
            if resident < len(p.blocks):
                log.info("low VRAM: %s keeps %d of %d blocks on %s, streams %d (%.2f GiB) at every call",
                         type(model).__name__, resident, len(p.blocks), device, len(p.blocks) - resident,
                         sum(p.block_bytes[resident:]) / GiB)
        return p

    def offload(self, model) -> None:
        """Return a placed model's weights to their CPU copies (nothing to do for a model never placed)."""
        p = self._placement(model)
        if p is not None:
            p.rest()

    def _placement(self, model) -> Placement | None:
        return self.placements.get(id(parts(model)[0]))

    def _offload_oldest(self, device, keep) -> bool:
        """Offload the least recently placed model on `device` other than `keep`; False when there is none."""
        for p in self.placements.values():
            if p is not keep and p.device == device:
                p.rest()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                return True
        return False

    def weights_fingerprint(self, module) -> tuple:
        """fingerprint(module), with placed tensors named by their CPU copies: the same while they are placed."""
        homes = {k: h for p in self.placements.values() for k, h in p.home.items()}
        return tuple((t.device, t.dtype, tuple(t.shape), t.data_ptr()) for t in
                     (homes.get(id(x), x) for x in itertools.chain(module.parameters(), module.buffers())))

    # -- the models' calls ----------------------------------------------------------------------------

    def encode_text(self, text_encoder, prompts, *, instruction=True, lowercase=False, cache: bool = True,
                    check: bool = True):
        """text_encoder.encode(prompts, ...) with Gemma's layers replayed from a graph (one per call length and
        batch). cache: reuse what this runtime computed before with these weights (the instruction's keys and
        values, TextEncoder.instruction_prefix; the embeddings of prompts without instruction, i.e. negative
        prompts); the result is the same as without. check: TextEncoder.encode's NaN check (False: the caller's)."""
        te = text_encoder

        def layers(embeds, mask, keys, values):
            return self.graphed(te.layers, (keys, values), module=te.on_device, key=("gemma",),
                                tokens=mask.numel(), max_tokens=GEMMA_MAX_TOKENS)(embeds, mask)

        def encode(prefix=None):
            return te.encode(prompts, instruction=instruction, lowercase=lowercase, layers=layers, prefix=prefix,
                             check=check)
        chi = instruction_text(instruction)
        if not cache:
            return encode()
        if chi:
            return encode(self.text_cache.get(te.model, ("prefix", chi), lambda: te.instruction_prefix(chi)))
        texts = (prompts,) if isinstance(prompts, str) else tuple(prompts)
        emb, mask = self.text_cache.get(te.model, ("negative", texts, lowercase), encode)
        return emb.clone(), mask.clone()

    def decode(self, autoencoder, latent: torch.Tensor, *, between=None) -> torch.Tensor:
        """Scaled latent (B, 32, h, w) -> images (B, 3, 32h, 32w) in [-1, 1], as free device memory allows:
        autoencoder.decode when its estimated activations fit, else decode_tiled with the biggest tile that
        fits (one sample at a time when the batch does not fit); the graphs' pool is given back first when
        an untiled decode needs it. Small decodes (DECODE_MAX_PIXELS) replay a graph. CPU: untiled.
        between: called between stages and tiles of a decode that is not replayed (a Cancel check)."""
        ae, device = autoencoder, torch.device(autoencoder.device)
        B, _, h, w = latent.shape
        if device.type == "cuda":
            self._release_if_short(device, DECODE_BYTES_PER_PIXEL * B * h * w * ae.spatial_compression ** 2)
            smallest = ae.activation_bytes(1, h, w, tile=DECODE_TILES[-1])
            while self.placements and smallest > self.available(device) and \
                    self._offload_oldest(device, self._placement(ae)):
                pass  # low VRAM: models placed before (the DiT) make room when not even the smallest tile fits
            free = self.available(device)
            if B > 1 and ae.activation_bytes(B, h, w) > free:
                return torch.cat([self.decode(ae, latent[i:i + 1], between=between) for i in range(B)])
            tile = decode_tile(ae, B, h, w, free)
            if tile is not None:
                return ae.decode_tiled(latent, tile=tile, between=between)
        return self.decode_untiled(ae, latent, between=between)

    def encode(self, autoencoder, image: torch.Tensor, *, between=None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latent (B, 32, H/32, W/32), as free device memory allows:
        autoencoder.encode when its estimated activations fit, else encode_tiled with the biggest tile that fits
        (exact: the same latent); the graphs' pool is given back first when an untiled encode needs it. CPU:
        untiled. between: called between the tiles and stages of a tiled encode (a Cancel check)."""
        ae, device = autoencoder, torch.device(autoencoder.device)
        B, _, H, W = image.shape
        if device.type == "cuda":
            self._release_if_short(device, ae.encode_activation_bytes(B, H, W))
            tile = fitting_tile(lambda t: ae.encode_activation_bytes(B, H, W, tile=t), max(H, W),
                                free_bytes(device))
            if tile is not None:
                return ae.encode_tiled(image, tile=tile, between=between)
        return ae.encode(image)

    def decode_untiled(self, autoencoder, latent: torch.Tensor, *, between=None) -> torch.Tensor:
        """autoencoder.decode(latent), replayed from a graph up to DECODE_MAX_PIXELS latent pixels."""
        B, _, h, w = latent.shape
        if B * h * w > DECODE_MAX_PIXELS:  # never replayed: interruptible between stages
            return autoencoder.decode(latent, between=between)
        decoder = self.graphed(autoencoder.decoder, (), module=autoencoder.decoder, key=("decode",),
                               tokens=B * h * w, max_tokens=DECODE_MAX_PIXELS)
        return autoencoder.decode(latent, decoder=decoder)

    def offload_text_encoder_if_short(self, text_encoder, transformer, *, forwards: int, width: int,
                                      height: int) -> bool:
        """text_encoder.offload() when free GPU memory is short of sampling plus an untiled decode
        (text_encoder_should_offload); returns whether it did. Never on the CPU. forwards: latents per DiT
        call (batch x CFG/PAG groups)."""
        device = transformer.device
        if device.type != "cuda" or torch.device(text_encoder.device).type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(device)
        if not text_encoder_should_offload(free, transformer.config, transformer.dtype.itemsize, forwards,
                                           width, height):
            return False
        text_encoder.offload()
        torch.cuda.empty_cache()
        return True

    def _release_if_short(self, device, need: float) -> None:
        """Give the graphs' pool back when free memory without it is short of `need` bytes."""
        held = self.held_bytes(device)
        if held and self.available(device) - held < need:
            self.release()


def decode_tile(autoencoder, batch: int, h: int, w: int, free: int):
    """None when the decode of a (batch, 32, h, w) latent fits in `free` bytes, else the biggest tile
    (pixels) with which decode_tiled fits (the smallest one tried when none does)."""
    ae = autoencoder
    return fitting_tile(lambda t: ae.activation_bytes(batch, h, w, tile=t), max(h, w) * ae.spatial_compression, free)


def fitting_tile(activation_bytes, side: int, free: int):
    """None when activation_bytes(None) (untiled) fits in `free` bytes, else the biggest of DECODE_TILES under
    the image's longer `side` (pixels) whose activation_bytes(tile) fits (the smallest one when none does)."""
    if activation_bytes(None) <= free:
        return None
    tiles = [t for t in DECODE_TILES if t < side]
    fits = [t for t in tiles if activation_bytes(t) <= free]
    return fits[0] if fits else (tiles[-1] if tiles else None)


def text_encoder_should_offload(free, config, element_size, forwards, width, height) -> bool:
    """Whether `free` GPU memory is short of sampling plus an untiled decode (estimates): then the text
    encoder (~5 GB) moves to the CPU. forwards: latents per DiT call (batch x CFG/PAG groups)."""
    tokens = (width // resolution.LATENT_FACTOR) * (height // resolution.LATENT_FACTOR)
    dit = forwards * tokens * config.width * element_size * 24  # residual stream + 5x-wide Mix-FFN, with slack
    decode = DECODE_BYTES_PER_PIXEL * width * height * (2 if element_size >= 4 else 1)
    return free < dit + decode + 2**30


def sampling_bytes(config, forwards: int, tokens: int, element_size: int) -> int:
    """Estimated peak device memory of one DiT call beyond its weights (bytes), what low VRAM reserves: the
    residual stream, the normed input, the Mix-FFN's 2H- and H-wide activations and its output for `forwards`
    latents of `tokens` tokens (x 1.5), the caption's keys/values, and two dequantized Mix-FFN weights."""
    acts = forwards * tokens * (3 * config.width + 3 * config.mlp_hidden) * element_size
    caption = 2 * config.depth * forwards * 300 * config.width * element_size
    return int(1.5 * acts) + caption + 2 * 2 * config.width * config.mlp_hidden * element_size
