"""SanaEmptyLatent's presets and the text encoder's device: what users pick, and what older files hold.

ComfyUI rejects a widget value that is not in its list ("Value not in list") unless the node's
VALIDATE_INPUTS takes that input; every value a round-1 workflow or API prompt can hold must pass.
"""
import inspect
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sana_core.resolution import ASPECT_RATIO_BINS, COMMON_RATIOS, binned_size, bin_sizes, parse_aspect_ratio
from sana_nodes.latent import CUSTOM, PRESETS, SanaEmptyLatent
from sana_nodes.loaders import SanaTextEncoderLoader

# The round-1 preset list as main shipped it: "custom" and every bin size as "BASE: WxH (reduced ratio)".
ROUND1_CHOICES = json.loads((Path(__file__).parent / "data" / "round1_preset_choices.json").read_text())


def accepted(cls, name, value):
    """ComfyUI's rule (execution.validate_inputs): the node's own check if it takes `name`, else the list."""
    if hasattr(cls, "VALIDATE_INPUTS") and name in inspect.signature(cls.VALIDATE_INPUTS).parameters:
        return cls.VALIDATE_INPUTS(**{name: value}) is True
    choices = cls.INPUT_TYPES()["required"][name][0]
    return value in choices


def preset_spec():
    return SanaEmptyLatent.INPUT_TYPES()["required"]["preset"]


def test_presets_are_common_ratios_at_the_nearest_trained_size_grouped_by_class():
    choices, options = preset_spec()
    assert choices[0] == CUSTOM and choices[1:] == list(PRESETS)
    classes = [label.split(" · ")[0] for label in choices[1:]]
    assert classes == sorted(classes, key=classes.index)  # each class in one run
    assert list(dict.fromkeys(classes)) == ["1024px", "2K", "4K", "512px"]
    base = {"512px": 512, "1024px": 1024, "2K": 2048, "4K": 4096}
    for label, (width, height) in PRESETS.items():
        cls, ratio, size = label.split(" · ")
        assert size == f"{width}x{height}" and ratio in COMMON_RATIOS
        assert (width, height) == binned_size(ratio, base[cls]) and (width, height) in bin_sizes(base[cls])
    for typed in ["16:9", "3:2", "4:3", "9:16", "21:9", "1:1", "2:3", "5:4"]:
        found = [label for label in choices if typed in label]  # what the combo's filter box shows
        assert len(found) == 4, (typed, found)
        assert all(abs(parse_aspect_ratio(f"{w}:{h}") - parse_aspect_ratio(typed)) < 0.1
                   for w, h in map(PRESETS.get, found)), found


def test_fresh_node_shows_the_preset_of_its_default_size():
    required = SanaEmptyLatent.INPUT_TYPES()["required"]
    default = required["preset"][1]["default"]
    assert PRESETS[default] == (required["width"][1]["default"], required["height"][1]["default"]) == (1024, 1024)


def test_trained_sizes_for_the_frontend_are_every_bin_size():
    trained = json.loads(json.dumps(preset_spec()[1]["trained_sizes"]))  # as /object_info sends it
    assert trained == {str(base): [list(s) for s in bin_sizes(base)] for base in ASPECT_RATIO_BINS}


def test_every_round1_preset_is_still_accepted_and_makes_its_size():
    assert len(ROUND1_CHOICES) == 147 and "1024: 1344x768 (7:4)" in ROUND1_CHOICES
    for label in ROUND1_CHOICES:
        assert accepted(SanaEmptyLatent, "preset", label), label
        latent, = SanaEmptyLatent().generate(label, 64, 32, 1)
        size = re.match(r"\d+: (\d+)x(\d+) ", label)  # a preset wins over width/height; custom keeps them
        width, height = map(int, size.groups()) if size else (64, 32)
        assert tuple(latent["samples"].shape) == (1, 32, height // 32, width // 32), label
    for label in list(PRESETS):
        assert accepted(SanaEmptyLatent, "preset", label)


def test_an_unknown_preset_is_rejected_with_what_to_pick():
    message = SanaEmptyLatent.VALIDATE_INPUTS("1024: 1000x1000 (1:1)")
    assert "not one of SanaEmptyLatent's presets" in message and "1024px · 1:1 · 1024x1024" in message
    with pytest.raises(ValueError, match="pick one from the list"):
        SanaEmptyLatent().generate("16:9", 1024, 1024, 1)


def test_text_encoder_device_defaults_to_auto_and_keeps_round1_values():
    choices, options = SanaTextEncoderLoader.INPUT_TYPES()["required"]["device"]
    assert options["default"] == "auto" and choices[0] == "auto"
    for value in ["gpu", "gpu, offload after encoding", "cpu"]:  # round 1's list
        assert accepted(SanaTextEncoderLoader, "device", value)
    assert "--lowvram" in options["tooltip"] and "auto:" in options["tooltip"]


def test_text_encoder_device_choices_reach_the_host(monkeypatch):
    from sana_nodes import loaders

    placements = []
    monkeypatch.setattr(loaders, "_load", lambda kind, name, dtype, placement: placements.append(placement)
                        or SimpleNamespace())
    choices, _ = SanaTextEncoderLoader.INPUT_TYPES()["required"]["device"]
    offloaded = [SanaTextEncoderLoader().load("gemma", "auto", device)[0].offload_after_use for device in choices]
    assert list(zip(choices, placements, offloaded)) == [
        ("auto", "auto", False), ("gpu", "gpu", False), ("gpu, offload after encoding", "gpu", True), ("cpu", "cpu", False)]


def test_auto_runs_the_text_encoder_where_comfyui_runs_text_encoders():
    from sana_nodes import host

    class ModelManagement:  # comfy.model_management as it answers with --lowvram on a GPU machine
        def get_torch_device(self):
            return torch.device("cuda", 0)

        def text_encoder_device(self):
            return torch.device("cpu")

        def text_encoder_offload_device(self):
            return torch.device("cpu")

    comfy = object.__new__(host.ComfyHost)  # without ComfyUI's modules: only its model_management is asked
    comfy.mm = ModelManagement()
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert comfy.devices("text_encoder", "auto") == (cpu, cpu)
    assert comfy.devices("text_encoder", "gpu") == (gpu, cpu)
    assert comfy.devices("text_encoder", "cpu") == (cpu, cpu)
