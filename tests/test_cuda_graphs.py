"""sana_core.runtime's CUDA graphs without a GPU: when a step runs eagerly, how graphs are keyed, reused,
invalidated when the weights move or change dtype, and bounded. The capture itself is replaced by a
stand-in that records what it was given and "replays" by calling the function on its static buffers;
the real capture is checked on the GPU by bench/bench.py --rows smoke."""
import collections

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from sana_core import runtime as cg
from sana_core.autoencoder import load_autoencoder
from sana_core.demo import write_demo_autoencoder, write_demo_text_encoder
from sana_core.text_encoder import load_text_encoder
from sana_core.guidance import sample_latents
from sana_core.transformer import SanaConfig, SanaTransformer, random_state_dict


class StandIn(cg.CapturedCall):
    """CapturedCall without CUDA: static copies of inputs and constants, replay = fn on them."""
    made = []

    def __init__(self, fn, inputs, constants, pool):
        self.fn = fn
        self.inputs = [t.clone() for t in inputs]
        self.constants = cg._map(torch.clone, constants)
        self.replays = 0
        StandIn.made.append(self)

    def __call__(self, inputs):
        for static, value in zip(self.inputs, inputs):
            static.copy_(value)
        self.replays += 1
        return self.fn(*self.inputs, *self.constants)


class StandInRuntime(cg.Runtime):
    capture = StandIn


@pytest.fixture
def standin(monkeypatch):
    """A runtime that captures on the CPU, with the stand-in, keeping 2 graphs."""
    StandIn.made = []
    monkeypatch.setattr(cg.GraphedStep, "_why_eager", lambda self, inputs: "")
    return StandInRuntime(max_graphs=2)


def model_and_fn():
    lin = nn.Linear(4, 4)
    calls = []

    def fn(x, scale):
        calls.append(1)
        return lin(x) * scale
    return lin, fn, calls


def test_fingerprint_follows_moves_casts_and_swaps_not_in_place_updates():
    lin = nn.Linear(4, 4)
    fp = cg.fingerprint(lin)
    assert cg.fingerprint(lin) == fp
    with torch.no_grad():
        lin.weight.mul_(2)  # same memory: a graph would read the new values, nothing to re-capture
    assert cg.fingerprint(lin) == fp
    lin.weight.data = lin.weight.data.clone()  # swapped (how a reload or a patcher replaces weights)
    assert cg.fingerprint(lin) != fp
    fp = cg.fingerprint(lin)
    lin.to(torch.float64)
    assert cg.fingerprint(lin) != fp


def test_calls_above_max_tokens_run_eagerly():
    lin, fn, _ = model_and_fn()
    step = cg.Runtime().graphed(fn, (torch.tensor(1.0),), module=lin, key="k", tokens=9, max_tokens=8)
    step(torch.randn(2, 4))
    assert step.reason.startswith("9 tokens per call > 8")


def test_cpu_and_switch_off_run_eagerly_with_a_reason(monkeypatch):
    lin, fn, calls = model_and_fn()
    x, scale = torch.randn(2, 4), torch.tensor(3.0)
    step = cg.Runtime().graphed(fn, (scale,), module=lin, key="k", tokens=8)
    assert torch.equal(step(x), fn(x, scale)) and "cuda" in step.reason.lower()
    monkeypatch.setenv(cg.ENV, "0")
    off = cg.Runtime().graphed(fn, (scale,), module=lin, key="k", tokens=8)
    off(x)
    assert "off" in off.reason and off.fingerprint is None  # no fingerprint work when switched off
    monkeypatch.setenv(cg.ENV, "1")
    assert cg.Runtime().graphed(fn, (scale,), module=lin, key="k", tokens=8).enabled
    off = cg.Runtime(cuda_graphs=False).graphed(fn, (scale,), module=lin, key="k", tokens=8)  # the argument wins
    off(x)
    assert "off" in off.reason


def test_first_call_warms_up_the_second_captures_then_replays(standin):
    lin, fn, calls = model_and_fn()
    x, scale = torch.randn(2, 4), torch.tensor(3.0)
    step = standin.graphed(fn, (scale,), module=lin, key="k", tokens=8)
    assert torch.equal(step(x), fn(x, scale)) and step.captures == 0 and len(standin.cache) == 0  # eager warm-up
    x2 = torch.randn(2, 4)
    assert torch.equal(step(x2), fn(x2, scale)) and step.captures == 1 and StandIn.made[0].replays == 1
    x3 = torch.randn(2, 4)
    assert torch.equal(step(x3), fn(x3, scale)) and StandIn.made[0].replays == 2  # new input copied in
    # a new sampling call (new constants, same shapes and weights) reuses the graph with its constants loaded
    again = standin.graphed(fn, (torch.tensor(5.0),), module=lin, key="k", tokens=8)
    assert torch.equal(again(x2), fn(x2, torch.tensor(5.0))) and again.captures == 0 and len(StandIn.made) == 1


def test_new_shape_or_key_captures_another_and_the_cache_is_bounded(standin):
    lin, fn, _ = model_and_fn()
    scale = torch.tensor(1.0)
    for batch in (1, 2, 3):  # three shapes, room for two
        step = standin.graphed(fn, (scale,), module=lin, key="k", tokens=8)
        step(torch.randn(batch, 4)), step(torch.randn(batch, 4))
    assert len(StandIn.made) == 3 and len(standin.cache) == 2
    step = standin.graphed(fn, (scale,), module=lin, key="k", tokens=8)
    step(torch.randn(1, 4))  # the least recently used (batch 1) was dropped: captured again, no second warm-up
    assert step.captures == 1
    other = standin.graphed(fn, (scale,), module=lin, key="other guidance", tokens=8)
    other(torch.randn(1, 4)), other(torch.randn(1, 4))
    assert other.captures == 1 and len(StandIn.made) == 5  # a different key never shares a graph


def test_weights_that_move_or_change_dtype_drop_that_models_graphs(standin):
    lin, fn, _ = model_and_fn()
    keep, keep_fn, _ = model_and_fn()
    x, scale = torch.randn(2, 4), torch.tensor(1.0)
    for model, f in ((keep, keep_fn), (lin, fn)):  # another model's graph, and this one's
        step = standin.graphed(f, (scale,), module=model, key="k", tokens=8)
        step(x), step(x)
    lin.weight.data = lin.weight.data.clone()  # offloaded and reloaded: new addresses
    step = standin.graphed(fn, (scale,), module=lin, key="k", tokens=8)
    assert torch.equal(step(x), fn(x, scale)) and step.captures == 0  # stale graph dropped, warmed up anew
    assert len(standin.cache) == 1  # the other model's graph is untouched
    assert torch.equal(step(x), fn(x, scale)) and step.captures == 1 and len(standin.cache) == 2
    lin.to(torch.float64)
    x64 = x.double()
    step = standin.graphed(fn, (scale.double(),), module=lin, key="k", tokens=8)
    step(x64)
    assert torch.equal(step(x64), fn(x64, scale.double())) and step.captures == 1
    assert sum(ref() is lin for ref, _, _ in standin.cache.entries.values()) == 1


def test_a_deleted_models_graphs_go_at_the_next_lookup():
    cache = cg.GraphCache(max_graphs=4)
    gone, kept = nn.Linear(2, 2), nn.Linear(2, 2)
    cache.add("a", gone, cg.fingerprint(gone), lambda pool: "graph a", torch.device("cpu"))
    cache.add("b", kept, cg.fingerprint(kept), lambda pool: "graph b", torch.device("cpu"))
    del gone
    assert cache.get("b", kept, cg.fingerprint(kept)) == "graph b" and len(cache) == 1
    cache.clear()
    assert len(cache) == 0


def test_a_failed_capture_falls_back_to_eager_for_the_whole_call(standin, monkeypatch):
    lin, fn, calls = model_and_fn()

    class Broken(StandIn):
        def __init__(self, *a):
            raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(standin, "capture", Broken)
    x, scale = torch.randn(2, 4), torch.tensor(2.0)
    step = standin.graphed(fn, (scale,), module=lin, key="k", tokens=8)
    outs = [step(x) for _ in range(3)]
    assert len(calls) == 3  # one eager run per step: the failed capture is not retried
    assert all(torch.equal(o, fn(x, scale)) for o in outs)
    assert step.reason.startswith("capture failed") and len(standin.cache) == 0
    assert standin.broken.startswith("capture failed")  # this runtime captures no more


def test_a_step_that_syncs_with_the_host_is_never_captured(standin, monkeypatch):
    """A warm-up that synchronised (e.g. .item()) is not captured; a second one that did too makes the
    step eager for good (once could be a first-call cache fill)."""
    lin, fn, calls = model_and_fn()
    syncs = iter(["called a synchronizing CUDA operation", "called a synchronizing CUDA operation"])
    monkeypatch.setattr(cg, "_warm_up", lambda f, i, c: (f(*i, *c), next(syncs, "")))
    x, scale = torch.randn(2, 4), torch.tensor(2.0)
    step = standin.graphed(fn, (scale,), module=lin, key="k", tokens=8)
    assert torch.equal(step(x), fn(x, scale)) and not step.reason  # tried again at the next step
    assert torch.equal(step(x), fn(x, scale)) and "synchronises" in step.reason
    step(x)
    assert len(StandIn.made) == 0 and not standin.broken  # nothing captured, graphs still usable elsewhere


def test_sampling_through_the_graph_path_equals_eager(standin, monkeypatch):
    """sample_latents with its step captured (stand-in replay on static buffers, constants loaded once)
    gives the eager result bit for bit, for CFG and CFG+PAG, and a second call reuses the graph."""
    cfg = SanaConfig(depth=2, width=64, caption_dim=48, self_heads=2, cross_heads=2, mlp_hidden=160)
    model = SanaTransformer(cfg)
    model.load_state_dict(random_state_dict(cfg, seed=1))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 32, 3, 2, generator=g)
    cond, uncond = torch.randn(1, 7, 48, generator=g), torch.randn(1, 7, 48, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    kw = dict(sampler="flow_dpm_solver", steps=4, shift=3.0, cfg=4.5)
    for pag in (0.0, 2.0):
        eager = sample_latents(model, noise, cond, mask, uncond, mask, pag_scale=pag, pag_layers=(1,), **kw)
        made = len(StandIn.made)
        graphed = sample_latents(model, noise, cond, mask, uncond, mask, pag_scale=pag, pag_layers=(1,), **kw,
                                 runtime=standin)
        assert len(StandIn.made) == made + 1 and torch.equal(graphed, eager)
        again = sample_latents(model, noise, cond, mask, uncond, mask, pag_scale=pag, pag_layers=(1,), **kw,
                               runtime=standin)
        assert len(StandIn.made) == made + 1 and torch.equal(again, eager)


def test_gemma_and_decode_through_the_graph_path_equal_eager(standin, monkeypatch, tmp_path):
    """Gemma's layers (one graph per prompt length) and the DC-AE decode replayed from (stand-in) graphs
    give the eager results: each runs eagerly at its first call, is captured at the second, replayed after."""
    standin.cache.max_graphs = 4
    te = load_text_encoder(write_demo_text_encoder(tmp_path / "te.safetensors"), device="cpu")
    ae = load_autoencoder(write_demo_autoencoder(tmp_path / "ae.safetensors"), device="cpu")
    latent = torch.randn(1, 32, 2, 3, generator=torch.Generator().manual_seed(0))
    calls = [lambda: standin.encode_text(te, ["a red fox"], cache=False)[0],  # cached: test_prefix_cache.py
             lambda: standin.encode_text(te, [""], instruction=False, cache=False)[0],
             lambda: standin.decode(ae, latent)]
    monkeypatch.setattr(cg.GraphedStep, "_why_eager", lambda self, inputs: "eager reference")
    eager = [call() for call in calls]
    monkeypatch.setattr(cg.GraphedStep, "_why_eager", lambda self, inputs: "")
    for made in (0, 3, 3):  # captured once each (two prompt lengths, one decode)
        assert all(torch.equal(call(), ref) for call, ref in zip(calls, eager))
        assert len(StandIn.made) == made
    assert all(made.replays >= 1 for made in StandIn.made)
    for _ in range(3):  # the models' own calls are model code only: they never capture
        te.encode(["a red fox"]), ae.decode(latent), ae.decode_tiled(latent, tile=32)
    assert len(StandIn.made) == 3


class HostSyncs(TorchDispatchMode):
    """Counts the ops that would wait for the GPU on CUDA (a value read on the host: .item(), bool(),
    nonzero, ...; a tensor made from host data, torch.tensor(0.0, device=...): a pageable copy), seen here on
    the CPU."""
    SYNCING = ("_local_scalar_dense", "nonzero", "is_nonzero", "masked_select", "unique", "equal", "lift_fresh")

    def __init__(self):
        super().__init__()
        self.found = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(s in func.__name__ for s in self.SYNCING):
            self.found[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_graphed_calls_never_wait_for_the_host(tmp_path):
    """What the graphs capture (the DiT step, Gemma's layers, the decoder) reads no value on the host: such a
    read would make the warm-up fall back to eager and lose the graph."""
    te = load_text_encoder(write_demo_text_encoder(tmp_path / "te.safetensors"), device="cpu")
    ae = load_autoencoder(write_demo_autoencoder(tmp_path / "ae.safetensors"), device="cpu")
    cfg = SanaConfig(depth=2, width=64, caption_dim=48, self_heads=2, cross_heads=2, mlp_hidden=160)
    dit = SanaTransformer(cfg)
    dit.load_state_dict(random_state_dict(cfg, seed=1))
    tokens = te.tokenizer(["a red fox"], padding="max_length", max_length=40, return_tensors="pt")
    caption = dit.encode_caption(torch.randn(2, 7, 48), torch.tensor([[1] * 7, [1] * 4 + [0] * 3]))
    t = torch.tensor([500.0, 500.0])
    with torch.inference_mode(), HostSyncs() as syncs:
        te.layers(te.model.embed_tokens(tokens.input_ids), tokens.attention_mask)
        ae.decoder(torch.randn(1, 32, 2, 3))
        dit(torch.randn(2, 32, 3, 2), t, caption)
    assert not syncs.found


def test_weights_moved_by_a_host_frees_graphs_and_position_cache(monkeypatch):
    """After ComfyUI's (or our) host moves any model's weights, the graphs (their pool holds device memory)
    and the DiT's cached position embedding (made on the old device) must go."""
    from sana_nodes.host import _weights_moved
    cfg = SanaConfig(depth=1, width=64, caption_dim=48, self_heads=2, cross_heads=2, mlp_hidden=160,
                     pe_interpolation=1.0, base_size=4)
    model = SanaTransformer(cfg)
    model.load_state_dict(random_state_dict(cfg, seed=1))
    runtime, released = cg.Runtime(), []
    monkeypatch.setattr(runtime, "release", lambda: released.append(1))
    model(torch.randn(1, 32, 2, 3), torch.tensor([500.0]), torch.randn(1, 5, 48))
    assert model._pos_embed is not None
    _weights_moved(model, runtime)
    assert released == [1] and model._pos_embed is None
    _weights_moved(object(), runtime)  # a model without caches of its own (the DC-AE, the text encoder)
    assert released == [1, 1]
