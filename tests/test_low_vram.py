"""Low VRAM (sana_core.runtime: Runtime(max_vram=...).place / offload, Placement): a model that does not fit
runs with its blocks streamed one by one and computes exactly what it computes whole; what fits stays; models
placed before make room; what cannot fit gets a message that says what to change.

On the CPU the "device" is the CPU too (the same copies, made synchronously): the bookkeeping, the hooks and
the results are what the GPU path runs; the side-stream prefetch is measured by bench/low_vram.py.
"""
from pathlib import Path

import pytest
import torch

from sana_core.quantized_files import quantize_checkpoint
from sana_core.runtime import GiB, Placement, Runtime, parts, resident_blocks, sampling_bytes, vram_bytes
from sana_core.transformer import CONFIGS, SanaConfig, SanaTransformer, config_metadata, load_transformer, \
    random_state_dict

TINY = SanaConfig(depth=4, width=64, caption_dim=48, self_heads=2, cross_heads=2, mlp_hidden=160)
CPU = torch.device("cpu")


def tiny(seed=0):
    model = SanaTransformer(TINY).eval()
    model.load_state_dict(random_state_dict(TINY, seed=seed))
    return model


def run(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 3, 5, generator=g)
    context = torch.randn(2, 6, TINY.caption_dim, generator=g)
    with torch.no_grad():
        return model(x, torch.full((2,), 500.0), context, torch.ones(2, 6))


def block_bytes(model):
    return sum(t.numel() * t.element_size() for t in model.blocks[0].parameters())


def test_max_vram_is_read_as_gib_bytes_or_text():
    assert vram_bytes(None) is None
    assert vram_bytes(7) == 7 * GiB and vram_bytes(7.5) == int(7.5 * GiB)
    assert vram_bytes(6 * GiB) == 6 * GiB  # large numbers are bytes
    assert vram_bytes("7GiB") == vram_bytes("7G") == vram_bytes("7") == 7 * GiB
    assert vram_bytes("6000MiB") == 6000 * 2**20
    for bad in ("lots", 0, -1):
        with pytest.raises(ValueError, match="max_vram"):
            vram_bytes(bad)


def test_plan_keeps_the_leading_blocks_that_fit_beside_two_streamed_ones():
    assert resident_blocks(10, [5] * 4, 30) == 4  # everything fits: whole
    assert resident_blocks(10, [5] * 4, 29) == 1  # 10 fixed + 2 x 5 streaming + 1 x 5 resident
    assert resident_blocks(10, [5] * 4, 20) == 0
    assert resident_blocks(10, [5] * 4, 19) is None  # not even two blocks beside the fixed part


def test_streamed_blocks_compute_what_the_whole_model_computes():
    """Blocks 1..3 streamed: the same output bit for bit; between calls they are at home (their CPU copies);
    while a streamed block runs, at most it and the prefetched next one hold copies."""
    model = tiny()
    expected = run(model)
    p = Placement(model, model.blocks)
    homes = [[t.data_ptr() for t in ts] for ts in p.block_tensors]
    away = lambda: [i for i, ts in enumerate(p.block_tensors) if any(  # noqa: E731
        t.data_ptr() != h for t, h in zip(ts, homes[i]))]
    seen = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: seen.append((i, away(), sorted(p.loaded))))
    p.apply(CPU, resident=1)
    assert torch.equal(run(model), expected)
    assert torch.equal(run(model), expected)  # the second call starts from the prefetched first streamed block
    following = {1: 2, 2: 3, 3: 1}
    assert [(i, moved, loaded) for i, moved, loaded in seen if i >= 1] == \
        [(i, [i], sorted({i, following[i]})) for i in (1, 2, 3)] * 2, seen
    assert away() == [] and sorted(p.loaded) == [1]  # block 1 prefetched for the next call
    p.rest()
    assert away() == [] and p.hooks == []
    assert torch.equal(run(model), expected)


def test_quantized_blocks_stream_in_their_stored_form(tmp_path):
    """A Q8_0 file's blocks stream as they are stored (uint8 blocks), with the same result as whole."""
    pytest.importorskip("gguf")
    from safetensors.torch import save_file
    source = tmp_path / "tiny.safetensors"
    save_file(random_state_dict(TINY), str(source), metadata=config_metadata(TINY))
    quantize_checkpoint(source, tmp_path / "tiny_q8.gguf", "q8_0")
    model = load_transformer(tmp_path / "tiny_q8.gguf", dtype=torch.float32, device="cpu")
    expected = run(model)
    runtime = Runtime(max_vram=sum(t.numel() * t.element_size() for t in model.state_dict().values()) - 1)
    runtime.place(model, CPU)
    p = runtime.placements[id(model)]
    assert p.resident < TINY.depth
    assert {t.dtype for t in p.block_tensors[-1]} >= {torch.uint8}  # what travels: the stored bytes
    assert torch.equal(run(model), expected)


def test_place_streams_what_does_not_fit_and_offloads_older_models_only_when_streaming_does_not_fit():
    dit, other = tiny(0), tiny(1)
    size = sum(t.numel() * t.element_size() for t in dit.state_dict().values())
    runtime = Runtime(max_vram=size)
    runtime.place(dit, CPU)
    assert runtime.placements[id(dit)].resident == TINY.depth  # alone: whole
    runtime.place(dit, CPU, reserve=block_bytes(dit))  # its activations need one block's room: three stream
    assert runtime.placements[id(dit)].resident == TINY.depth - 3  # (room for two streamed blocks)
    runtime.place(other, CPU, reserve=size - 4 * block_bytes(dit))  # streams beside the DiT? no: offloads it
    assert runtime.placements[id(dit)].device is None and runtime.placements[id(other)].device == CPU
    runtime.offload(dit)
    assert runtime.placements[id(dit)].device is None
    assert torch.equal(run(dit), run(tiny(0)))


def test_what_cannot_fit_says_what_needs_how_much_and_what_to_change():
    model = tiny()
    runtime = Runtime(max_vram=2 * block_bytes(model))  # not even the fixed part beside two blocks
    with pytest.raises(MemoryError, match=r"max_vram .* SanaTransformer.*streamed one by one.*Raise max_vram"
                                          r".*quantized"):
        runtime.place(model, CPU)


def test_text_cache_survives_placement():
    """Gemma is placed for each encode and offloaded after: the cached instruction keys stay valid (its CPU
    copies name the weights)."""
    model = tiny()
    runtime = Runtime(max_vram=GiB)
    before = runtime.weights_fingerprint(model)
    runtime.place(model, CPU)
    runtime.offload(model)
    runtime.place(model, CPU, reserve=GiB - 2 * block_bytes(model) - 10**6)
    assert runtime.weights_fingerprint(model) == before != ()


def test_parts_of_each_model():
    model = tiny()
    assert parts(model) == (model, model.blocks)

    class Encoder:  # a TextEncoder's shape: on_device, model.layers
        on_device = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
        model = type("Gemma", (), {"layers": on_device})()
    assert parts(Encoder())[1] is Encoder.on_device


def test_sampling_estimate_covers_a_4096_cfg_step():
    """The reserve for the 1.6B model at 4096 px with CFG: the Mix-FFN's 2 x 16384 x 11200 bf16 activation
    (734 MB) and its neighbours, about 2.4 GB."""
    estimate = sampling_bytes(CONFIGS["sana-1.6b"], 2, 128 * 128, 2)
    assert 2.0e9 < estimate < 3.0e9


def test_pipeline_max_vram_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    from sana_core.pipeline import SanaPipeline
    with pytest.raises(ValueError, match="max_vram caps GPU memory"):
        SanaPipeline(tiny(), None, None, max_vram=7)


def test_a_layer_of_a_streamed_block_called_on_its_own_gets_its_weights():
    """encode_caption calls each block's cross-attention k/v layer outside the block's call."""
    model = tiny()
    expected = model.encode_caption(torch.randn(1, 6, TINY.caption_dim, generator=torch.Generator().manual_seed(0)))
    p = Placement(model, model.blocks)
    lend, lent = p._lend, []

    def spy(i, own):
        lent.append((i, own[0] is model.blocks[i].cross_attn.kv_linear.weight))
        lend(i, own)
    p._lend = spy
    p.apply(CPU, resident=1)
    got = model.encode_caption(torch.randn(1, 6, TINY.caption_dim, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(a, b) for x, y in zip(expected.kv, got.kv) for a, b in zip(x, y))
    assert lent == [(1, True), (2, True), (3, True)]  # the streamed blocks' k/v layers, lent their weights


def sana_run_image(tmp_path, name, max_vram):
    """sana-run's host (CPU, the demo models in tmp_path/models) running the shipped workflow `name` at 64 px in
    2 steps with max_vram: the saved image and the runtime's placements by model class."""
    import numpy as np
    from PIL import Image

    from sana_nodes import host, runner
    local = host.LocalHost(tmp_path / "models", device="cpu", output_dir=tmp_path / f"{name}-{max_vram}",
                           max_vram=max_vram)
    previous, host._host = host._host, local
    try:
        prompt, _ = runner.load_workflow(str(Path(__file__).resolve().parents[1] / "workflows" / "api" / name))
        runner.use_demo_models(prompt)
        runner.apply_sets(prompt, ["SANA Sampler.steps=2", "SanaEmptyLatent.preset=custom",
                                   "SanaEmptyLatent.width=64", "SanaEmptyLatent.height=64"])
        ui = runner.execute(prompt, log=lambda msg: None)
    finally:
        host._host = previous
    out = next(i for o in ui.values() for i in o.get("images", []))
    with Image.open(tmp_path / f"{name}-{max_vram}" / out["subfolder"] / out["filename"]) as png:
        placed = {type(p.module).__name__: p for p in local.runtime.placements.values()}
        return np.asarray(png), placed


def test_sana_run_low_vram_places_each_model_and_makes_the_same_image(tmp_path):
    """sana-run's host with max_vram (here on the CPU; the demo models have two blocks, too few to stream): the
    demo workflow gives the image it gives without; Gemma is offloaded once the DiT needs the memory, the DiT
    when the DC-AE does not fit beside it; a cap too small for the DiT is the sampler node's clear error."""
    import numpy as np

    from sana_core.autoencoder import DCAE
    from sana_core.demo import write_demo_models
    from sana_nodes import runner
    from sana_nodes.sampling import dit_memory_required
    write_demo_models(tmp_path / "models")

    def image(max_vram):
        return sana_run_image(tmp_path, "sana_1024_text_to_image.json", max_vram)

    plain, _ = image(None)
    same, roomy = image(GiB)
    dit, ae, te = roomy["SanaTransformer"], roomy[DCAE.__name__], roomy["ModuleList"]
    assert dit.resident == len(dit.blocks) and ae.device == CPU and te.device is None  # Gemma left after encoding
    assert np.array_equal(same, plain)
    reserve = dit_memory_required(dit.module.config, 2, 4, 4)
    tight, placed = image(max(dit.bytes + reserve, ae.bytes) + 1)  # no room for the DC-AE beside the DiT
    assert placed["SanaTransformer"].device is None and placed[DCAE.__name__].device == CPU  # offloaded to decode
    assert np.array_equal(tight, plain)
    with pytest.raises(runner.WorkflowError, match="SanaSampler.*max_vram .* too small for the SanaTransformer"):
        image(dit.bytes - sum(dit.block_bytes) + 2 * max(dit.block_bytes) + reserve - 1)


def test_sana_run_low_vram_merges_the_models_loras(tmp_path):
    """A LoRA loader's MODEL under max_vram: its LoRA is merged into the placed weights' CPU copies (the image is
    the one without a cap, and differs from the plain model's)."""
    import numpy as np

    from sana_core.demo import write_demo_models
    write_demo_models(tmp_path / "models")
    plain, _ = sana_run_image(tmp_path, "sana_1024_text_to_image.json", None)
    with_lora, _ = sana_run_image(tmp_path, "sana_lora.json", None)
    capped, _ = sana_run_image(tmp_path, "sana_lora.json", GiB)
    assert not np.array_equal(with_lora, plain)
    assert np.array_equal(capped, with_lora)
