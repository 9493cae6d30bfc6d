"""The frontend extension (js/): its Node tests, and the JS logic checked against the Python it mirrors.

The JS has no bin table of its own: it reads the trained sizes from SanaEmptyLatent's preset option
"trained_sizes" and each preset's size from its label. These tests feed it the node's real definition
and compare with sana_core.resolution, and compare its loader folders with the ones the nodes search.
"""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOGIC = (ROOT / "js" / "sana_logic.js").as_uri()
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node (Node.js 20+) is not installed; the js/ tests need it")


def run_js(code: str, data) -> object:
    """Run an ES module with `data` as the global DATA; returns what it prints as JSON."""
    script = f"import * as logic from {json.dumps(LOGIC)};\nconst DATA = {json.dumps(data)};\n{code}"
    out = subprocess.run([NODE, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_node_test_runner_passes():
    """tests/js/*.test.mjs under `node --test`: bins, snapping, formatting and the extension wiring."""
    out = subprocess.run([NODE, "--test", "tests/js/"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "# fail 0" in out.stdout


def preset_spec():
    from sana_nodes.latent import SanaEmptyLatent

    return json.loads(json.dumps(SanaEmptyLatent.INPUT_TYPES()["required"]["preset"]))  # as /object_info sends it


def test_js_reads_every_trained_size_and_every_preset_from_the_node():
    from sana_core.resolution import ASPECT_RATIO_BINS, bin_sizes
    from sana_nodes.latent import PRESETS

    choices, options = preset_spec()
    trained = run_js("console.log(JSON.stringify(logic.trainedSizes(DATA)))", options["trained_sizes"])
    for base in ASPECT_RATIO_BINS:
        assert sorted((t["width"], t["height"]) for t in trained if t["bin"] == base) == sorted(bin_sizes(base))
    assert len(trained) == sum(len(t) for t in ASPECT_RATIO_BINS.values())
    # What the node does with a preset label is what the JS fills width/height with.
    presets = run_js("console.log(JSON.stringify(logic.presetsFromOptions(DATA)))", choices)
    assert {p["label"]: (p["width"], p["height"]) for p in presets} == PRESETS
    tables = {int(base): sizes for base, sizes in options["trained_sizes"].items()}
    assert all([p["width"], p["height"]] in tables[p["bin"]] for p in presets)  # each label's class is its bin


def test_js_native_size_is_sana_core_binned_size():
    """For sizes all over 256..8192, the JS's nearest native size is binned_size() in the JS's bin."""
    from sana_core.resolution import binned_size

    sizes = [(w, h) for w in range(256, 8193, 224) for h in range(256, 8193, 224)]
    sizes += [(1024, 3712), (3712, 1024), (1024, 3968), (704, 2048)]  # ratio-key ties and in-between ratios
    code = """const trained = logic.trainedSizes(DATA.trained)
console.log(JSON.stringify(DATA.sizes.map(([w, h]) => logic.nativeBin(trained, w, h))))"""
    native = run_js(code, {"trained": preset_spec()[1]["trained_sizes"], "sizes": sizes})
    for (w, h), n in zip(sizes, native):
        assert (n["width"], n["height"]) == binned_size((w, h), base=n["bin"]), (w, h, n)


def test_js_shows_round1_presets_as_what_they_make():
    """A round-1 workflow's preset label becomes today's preset of the same size, or custom at that size."""
    from sana_nodes.latent import PRESETS, SanaEmptyLatent

    round1 = json.loads((ROOT / "tests" / "data" / "round1_preset_choices.json").read_text())[1:]
    choices, _ = preset_spec()
    upgrades = run_js("console.log(JSON.stringify(DATA.old.map((v) => logic.upgradePreset(DATA.choices, v))))",
                      {"old": round1, "choices": choices})
    by_size = {size: label for label, size in PRESETS.items()}
    for label, upgrade in zip(round1, upgrades):
        size = SanaEmptyLatent().generate(label, 32, 32, 1)[0]["samples"].shape[-2:]
        assert (upgrade["height"] // 32, upgrade["width"] // 32) == tuple(size), label
        assert upgrade["preset"] == by_size.get((upgrade["width"], upgrade["height"]), "custom"), label


def test_js_loader_folders_are_the_ones_the_nodes_search():
    from sana_nodes import host

    kinds = {"SanaModelLoader": "transformer", "SanaTextEncoderLoader": "text_encoder", "SanaVAELoader": "autoencoder",
             "SanaLoraLoader": "lora"}
    folders = run_js("console.log(JSON.stringify(logic.LOADER_FOLDERS))", None)
    assert folders == {cls: list(host.MODEL_FOLDERS[kind]) for cls, kind in kinds.items()}


def test_js_loader_file_widget_is_the_first_combo():
    """sana.js treats a loader's first combo input as its model file list."""
    from sana_nodes import loaders

    first = {"SanaModelLoader": "model_name", "SanaTextEncoderLoader": "text_encoder_name", "SanaVAELoader": "vae_name"}
    for cls, name in first.items():
        inputs = getattr(loaders, cls).INPUT_TYPES()["required"]
        combos = [k for k, spec in inputs.items() if isinstance(spec[0], list)]
        assert combos[0] == name, (cls, combos)
