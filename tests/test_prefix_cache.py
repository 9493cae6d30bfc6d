"""Host time. The instruction's keys and values computed once per text encoder (Runtime.encode_text) give today's
encoding exactly: float32 on the CPU, any instruction, batches of different lengths, truncation and padding,
a prompt whose first characters merge with the instruction's last tokens; recomputed when the weights
change. Negative captions are cached too. A tiny random Gemma-2 with a SentencePiece BPE tokenizer (the
demo's) stands in for gemma-2-2b-it. And where an image reads values on the host (a GPU sync)."""
import collections
import traceback

import pytest
import torch
from conftest import rel_err
from test_cuda_graphs import HostSyncs, StandIn, standin  # noqa: F401  (standin: a fixture)

from sana_core import load_autoencoder, load_transformer
from sana_core import runtime as cg
from sana_core.demo import write_demo_models, write_demo_text_encoder
from sana_core.pipeline import SanaPipeline
from sana_core.text_encoder import MAX_TOKENS, TextEncoder, instruction_text, load_text_encoder

MERGING = "Describe: sle"  # tokens [..., '▁s', 'le'] + "eping cat" -> [..., '▁sleeping', '▁cat']
BATCH = ["a cat sleeping on a warm windowsill", "", "  A Busy city street at DUSK  ",
         "a futuristic city with flying cars and neon signs " * 40]  # the last one is truncated


@pytest.fixture(scope="module")
def te(tmp_path_factory):
    path = write_demo_text_encoder(tmp_path_factory.mktemp("te") / "te.safetensors")
    return load_text_encoder(path, device="cpu", dtype=torch.float32)


def own_tokens(monkeypatch):
    """The token counts each Gemma call runs (the embeddings' lengths)."""
    seen, layers = [], TextEncoder.layers
    monkeypatch.setattr(TextEncoder, "layers", lambda self, e, *a: seen.append(e.shape[1]) or layers(self, e, *a))
    return seen


def assert_same(ours, ref):
    assert torch.equal(ours[1], ref[1]) and ours[0].shape == ref[0].shape == (*ref[1].shape, ref[0].shape[-1])
    assert rel_err(ours[0], ref[0]) < 1e-6


@pytest.mark.parametrize("instruction", [True, "sana-diffusers", MERGING])
@pytest.mark.parametrize("prompts", [BATCH, BATCH[:1], ["eping cat"]], ids=["batch", "one", "merging"])
@pytest.mark.parametrize("lowercase", [False, True])
def test_cached_prefix_equals_full_encoding(te, monkeypatch, instruction, prompts, lowercase):
    """Gemma runs only the tokens after the cached prefix; the captions and masks are today's."""
    ref = te.encode(prompts, instruction=instruction, lowercase=lowercase)
    runtime, seen = cg.Runtime(cuda_graphs=False), own_tokens(monkeypatch)
    for _ in range(2):  # the prefix computed at the first call, reused at the second
        assert_same(runtime.encode_text(te, prompts, instruction=instruction, lowercase=lowercase), ref)
    full = len(te.tokenizer.encode(instruction_text(instruction))) + MAX_TOKENS - 2
    calls = seen[::2] if "" in prompts else seen  # each encode's second call: the empty prompts, no instruction
    assert len(calls) == 2 and calls[0] == calls[1] < full


def test_tokens_merging_across_the_boundary_shorten_the_prefix(te, monkeypatch):
    """When the prompt's first characters merge with the instruction's last tokens, only the ids both
    tokenizations share come from the cache (checked per call, over the whole batch)."""
    chi_ids = te.tokenizer.encode(MERGING)
    ids = te.tokenizer.encode(MERGING + "eping cat")
    shared = next(i for i, (a, b) in enumerate(zip(chi_ids, ids)) if a != b)
    assert shared < len(chi_ids) - 1  # the test's premise: more than the last instruction token merges
    one, two = te.encode("a cat", instruction=MERGING), te.encode(["a cat", "eping cat"], instruction=MERGING)
    runtime, seen = cg.Runtime(cuda_graphs=False), own_tokens(monkeypatch)
    full = len(chi_ids) + MAX_TOKENS - 2
    assert_same(runtime.encode_text(te, "a cat", instruction=MERGING), one)
    assert_same(runtime.encode_text(te, ["a cat", "eping cat"], instruction=MERGING), two)
    assert seen == [full - (len(chi_ids) - 1), full - shared]


def test_prefix_recomputed_when_the_weights_change(te, monkeypatch):
    """One prefix per instruction, made again when the weights are other tensors (moved, cast, swapped) and
    after Runtime.release()."""
    runtime, made = cg.Runtime(cuda_graphs=False), []
    prefix = TextEncoder.instruction_prefix
    monkeypatch.setattr(TextEncoder, "instruction_prefix", lambda self, chi: made.append(chi) or prefix(self, chi))
    for _ in range(2):
        runtime.encode_text(te, BATCH[:2])
        runtime.encode_text(te, BATCH[:2], instruction="sana-diffusers")
    assert len(made) == 2  # once per instruction
    try:
        te.model.to(torch.float64)  # another dtype: other tensors
        ours = runtime.encode_text(te, BATCH[:2])
        assert len(made) == 3 and ours[0].dtype == torch.float64
        assert_same(ours, te.encode(BATCH[:2]))
    finally:
        te.model.to(torch.float32)
    runtime.release()  # drops the cached prefixes with the graphs
    runtime.encode_text(te, BATCH[:2])
    assert len(made) == 4


def test_negative_caption_cached(te, monkeypatch):
    """A prompt without instruction (the negative) is encoded once; each caller gets its own copy."""
    runtime, seen = cg.Runtime(cuda_graphs=False), own_tokens(monkeypatch)
    ref = te.encode("", instruction=False)
    first = runtime.encode_text(te, "", instruction=False)
    first[0].zero_()  # the caller's copy: the cache keeps its own
    second = runtime.encode_text(te, "", instruction=False)
    assert_same(second, ref)
    assert len(seen) == 2  # ref's and the first call's: the second came from the cache
    assert_same(runtime.encode_text(te, "blurry", instruction=False), te.encode("blurry", instruction=False))


def test_prefix_through_the_graph_path_equals_eager(te, standin):  # noqa: F811
    """Gemma's layers with the prefix's keys and values as the graph's constants (stand-in capture)."""
    prompts = [BATCH[0], BATCH[2]]  # (an empty prompt would run apart: a second graph)
    ref = te.encode(prompts)
    for made in (0, 1, 1):  # eager warm-up, captured, replayed
        assert_same(standin.encode_text(te, prompts), ref)
        assert len(StandIn.made) == made
    assert StandIn.made[0].replays == 2 and len(StandIn.made[0].constants[0]) == te.model.config.num_hidden_layers


def test_layers_with_a_prefix_never_wait_for_the_host(te):
    """What the graph captures (Gemma's layers after a prefix) reads no value on the host."""
    prefix = te.instruction_prefix(instruction_text(True))
    tokens = te.tokenizer(["a red fox"], padding="max_length", max_length=40, return_tensors="pt")
    with torch.inference_mode(), HostSyncs() as syncs:
        te.layers(te.model.embed_tokens(tokens.input_ids), tokens.attention_mask, prefix.keys, prefix.values)
    assert not syncs.found


class HostReads(HostSyncs):
    """HostSyncs by (op, the innermost sana_core function that made it)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(s in func.__name__ for s in self.SYNCING):
            where = [f.name for f in traceback.extract_stack() if "sana_core" in f.filename]
            self.found[(func.__name__.split(".")[0], where[-1] if where else "?")] += 1
        return func(*args, **(kwargs or {}))


def test_an_image_reads_the_host_only_where_it_must(tmp_path):
    """A warm 2-step CFG + PAG image: the caption, the mask and the guidance scales are made on the device and
    the negative caption comes from the cache; what is left is listed here (on a GPU, only the NaN checks wait)."""
    paths = write_demo_models(tmp_path)
    pipe = SanaPipeline(load_transformer(paths["transformer"], device="cpu"),
                        load_autoencoder(paths["autoencoder"], device="cpu"),
                        load_text_encoder(paths["text_encoder"], device="cpu"))
    kw = dict(width=64, height=64, steps=2, cfg=4.5, pag_scale=1.0, pag_layers=(1,))
    pipe("a fox", **kw)
    with HostReads() as reads:
        pipe("a fox", **kw)
    assert reads.found == collections.Counter({
        ("_local_scalar_dense", "encode"): 1,  # the shared token prefix (CPU ids)
        ("_unique2", "encode"): 1,  # the distinct token ids looked up in the CPU embedding table (CPU ids)
        ("_local_scalar_dense", "checking"): 1,  # the captions' NaN flag, read once the first step is queued
        ("lift_fresh", "encode"): 2,  # the tokenizer's CPU tensors (warning count, then the ids)
        ("lift_fresh", "flow_dpm_solver_sigmas"): 2,  # the schedule: CPU tensors from numpy
        ("_local_scalar_dense", "_flow_dpm_solver"): 2,  # sigma == 0 on the CPU schedule
        ("_local_scalar_dense", "finish"): 2,  # FiniteCheck: each step's flag read one step late
        ("is_nonzero", "_unscale"): 1,  # the decoder's NaN check (the GPU is idle after the last step's)
        ("_local_scalar_dense", "__call__"): 1,  # the pixels' NaN flag, read once the images are on the host
    })
