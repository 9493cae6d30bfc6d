"""The shipped workflows: UI form (what users drag into ComfyUI) checked against the node
definitions, and the API form checked to be its translation (nodes/runner.py: ui_to_api)."""
import inspect
import json
from pathlib import Path

import pytest

from sana_nodes import NODE_CLASS_MAPPINGS, host, runner
from sana_nodes.runner import (CORE_NODES, WorkflowError, input_specs, is_widget, load_workflow, ui_to_api,
                               widget_slots)

ROOT = Path(__file__).resolve().parents[1]
UI_WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
API_WORKFLOWS = sorted((ROOT / "workflows" / "api").glob("*.json"))

# ComfyUI's own nodes the workflows use, as ComfyUI defines them (nodes.py; MarkdownNote is a
# frontend-only node): socket inputs, widgets in order (with the values the frontend adds), outputs.
CORE_SPEC = {
    "SaveImage": {"sockets": {"images": "IMAGE"}, "widgets": [("filename_prefix", "STRING", 1)], "outputs": []},
    "PreviewImage": {"sockets": {"images": "IMAGE"}, "widgets": [], "outputs": []},
    "LoadImage": {"sockets": {}, "widgets": [("image", "COMBO", 2)], "outputs": ["IMAGE", "MASK"]},
    "MarkdownNote": {"sockets": {}, "widgets": [("text", "STRING", 1)], "outputs": []},
    "CLIPTextEncode": {"sockets": {"clip": "CLIP"}, "widgets": [("text", "STRING", 1)], "outputs": ["CONDITIONING"]},
    "VAEDecode": {"sockets": {"samples": "LATENT", "vae": "VAE"}, "widgets": [], "outputs": ["IMAGE"]},
    "VAEDecodeTiled": {"sockets": {"samples": "LATENT", "vae": "VAE"},
                       "widgets": [("tile_size", "INT", 1), ("overlap", "INT", 1), ("temporal_size", "INT", 1),
                                   ("temporal_overlap", "INT", 1)], "outputs": ["IMAGE"]},
    "VAEEncode": {"sockets": {"pixels": "IMAGE", "vae": "VAE"}, "widgets": [], "outputs": ["LATENT"]},
    "KSampler": {"sockets": {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING",
                             "latent_image": "LATENT"},
                 "widgets": [("seed", "INT", 2), ("steps", "INT", 1), ("cfg", "FLOAT", 1), ("sampler_name", "COMBO", 1),
                             ("scheduler", "COMBO", 1), ("denoise", "FLOAT", 1)], "outputs": ["LATENT"]},
    "Canny": {"sockets": {"image": "IMAGE"}, "widgets": [("low_threshold", "FLOAT", 1), ("high_threshold", "FLOAT", 1)],
              "outputs": ["IMAGE"]},
    "ControlNetApplyAdvanced": {"sockets": {"positive": "CONDITIONING", "negative": "CONDITIONING",
                                            "control_net": "CONTROL_NET", "image": "IMAGE", "vae": "VAE"},
                                "widgets": [("strength", "FLOAT", 1), ("start_percent", "FLOAT", 1),
                                            ("end_percent", "FLOAT", 1)], "outputs": ["CONDITIONING", "CONDITIONING"]},
    "SetLatentNoiseMask": {"sockets": {"samples": "LATENT", "mask": "MASK"}, "widgets": [], "outputs": ["LATENT"]},
    "ImagePadForOutpaint": {"sockets": {"image": "IMAGE"},
                            "widgets": [("left", "INT", 1), ("top", "INT", 1), ("right", "INT", 1),
                                        ("bottom", "INT", 1), ("feathering", "INT", 1)], "outputs": ["IMAGE", "MASK"]},
}
SEED_CONTROLS = ("fixed", "increment", "decrement", "randomize")
# Model files the workflows name: the published releases (see README).
PUBLISHED_MODELS = {
    "SanaModelLoader": {"Sana_1600M_1024px_BF16.pth", "Sana_1600M_4Kpx_BF16.pth", "Sana_Sprint_1.6B_1024px.pth"},
    "SanaTextEncoderLoader": {"gemma-2-2b-it"},
    "SanaVAELoader": {"dc-ae-f32c32-sana-1.1-diffusers"},
    "SanaControlNetLoader": {"Sana_1600M_1024px_BF16_ControlNet_HED.pth"},
    "SanaLoraLoader": {"sana_lora.safetensors"},  # the user's own LoRA (the workflow's note says so)
}


def definition(node_type):
    """(socket inputs {name: type}, widgets [(name, kind, slots, options)], output types) of a node type."""
    if node_type in NODE_CLASS_MAPPINGS:
        cls = NODE_CLASS_MAPPINGS[node_type]
        specs = input_specs(cls)
        sockets = {n: k for n, (k, o) in specs.items() if not is_widget(k)}
        widgets = [(n, "COMBO" if isinstance(k, list) else k, widget_slots(n, k, o), o)
                   for n, (k, o) in specs.items() if is_widget(k)]
        return sockets, widgets, list(cls.RETURN_TYPES)
    spec = CORE_SPEC[node_type]
    return spec["sockets"], [(n, k, s, {}) for n, k, s in spec["widgets"]], spec["outputs"]


def check_value(node, name, kind, options, value):
    where = f"node {node['id']} ({node['type']}) widget '{name}'"
    if kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an int"
        assert options.get("min", value) <= value <= options.get("max", value), f"{where}: {value} out of range"
        step = options.get("step")
        assert not step or step == 1 or value % step == 0, f"{where}: {value} is not a multiple of {step}"
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} is not a number"
        assert options.get("min", value) <= value <= options.get("max", value), f"{where}: {value} out of range"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r} is not a boolean"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not a string"
    elif kind == "COMBO":
        assert isinstance(value, str), f"{where}: {value!r} is not a string"
        choices = NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()["required"].get(name, [None])[0] \
            if node["type"] in NODE_CLASS_MAPPINGS else None
        if node["type"] in PUBLISHED_MODELS and name.endswith("_name"):
            assert value in PUBLISHED_MODELS[node["type"]], f"{where}: {value!r} is not a published model name"
        elif choices is not None:
            check = getattr(NODE_CLASS_MAPPINGS[node["type"]], "VALIDATE_INPUTS", None)
            if check and name in inspect.signature(check).parameters:  # ComfyUI asks the node, not the list
                assert check(**{name: value}) is True, f"{where}: {value!r} is refused"
            else:
                assert value in choices, f"{where}: {value!r} is not one of the node's choices"


def test_there_are_eight_workflows_in_both_forms():
    names = {p.name for p in UI_WORKFLOWS}
    assert names == {p.name for p in API_WORKFLOWS}
    assert names == {"sana_1024_text_to_image.json", "sana_4096_tiled_decode.json", "sana_sprint_2_steps.json",
                     "sana_image_to_image.json", "sana_controlnet_edges.json", "sana_lora.json",
                     "sana_inpaint.json", "sana_outpaint.json"}


def test_runner_core_nodes_have_comfyui_inputs():
    """sana-run's stand-ins for core nodes take what ComfyUI's do, so workflows move between them."""
    for name, cls in CORE_NODES.items():
        specs = input_specs(cls)
        spec = CORE_SPEC[name]
        assert {n: k for n, (k, _) in specs.items() if not is_widget(k)} == spec["sockets"]
        assert [(n, "COMBO" if isinstance(k, list) else k, widget_slots(n, k, o))
                for n, (k, o) in specs.items() if is_widget(k)] == spec["widgets"]
        assert list(cls.RETURN_TYPES) == spec["outputs"]
        assert cls.INPUT_TYPES().get("hidden", {}) == ({"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
                                                       if name in ("SaveImage", "PreviewImage") else {})


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_ui_workflow_matches_node_definitions(path):
    workflow = json.loads(path.read_text())
    assert workflow["version"] == 0.4
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]) and workflow["last_node_id"] >= max(nodes)
    assert workflow["last_link_id"] >= max(link[0] for link in workflow["links"])
    for node in nodes.values():
        assert node["type"] in NODE_CLASS_MAPPINGS or node["type"] in CORE_SPEC, f"unknown node type {node['type']}"
        sockets, widgets, outputs = definition(node["type"])
        # sockets: the node's input slots are the definition's socket inputs, every required one linked
        assert {i["name"]: i["type"] for i in node["inputs"]} == sockets, node["type"]
        required = NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()["required"] if node["type"] in NODE_CLASS_MAPPINGS \
            else sockets
        for slot in node["inputs"]:
            if slot["name"] in required:
                assert slot["link"] is not None, f"node {node['id']} ({node['type']}): '{slot['name']}' unconnected"
        assert [o["type"] for o in node["outputs"]] == outputs
        # widgets_values: one entry per widget, two after a seed (control after generate) or an upload combo
        values = node.get("widgets_values", [])
        assert len(values) == sum(w[2] for w in widgets), f"node {node['id']} ({node['type']}) widget count"
        for name, kind, slots, options in widgets:
            check_value(node, name, kind, options, values[0])
            if slots == 2 and kind == "INT":
                assert values[1] in SEED_CONTROLS
            values = values[slots:]
    for link_id, origin, origin_slot, target, target_slot, kind in workflow["links"]:
        source, dest = nodes[origin], nodes[target]
        assert source["outputs"][origin_slot]["type"] == kind, f"link {link_id}: source output is not {kind}"
        assert link_id in source["outputs"][origin_slot]["links"]
        assert dest["inputs"][target_slot]["type"] == kind, f"link {link_id}: {kind} into a " \
                                                            f"{dest['inputs'][target_slot]['type']} input"
        assert dest["inputs"][target_slot]["link"] == link_id


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_api_form_is_the_translation_of_the_ui_form(path, capsys):
    ui = json.loads(path.read_text())
    api = json.loads((path.parent / "api" / path.name).read_text())
    assert api == ui_to_api(ui)
    assert load_workflow(path)[0] == api and load_workflow(path.parent / "api" / path.name) == (api, None)
    previous = host._host
    try:
        assert runner.main([str(path), "--to-api"]) == 0  # how the API files are made
    finally:
        host._host = previous
    assert json.loads(capsys.readouterr().out) == api


def test_workflows_are_the_documented_recipes():
    """What each workflow is for: the sampler settings the README promises."""
    def sampler(name):
        api = json.loads((ROOT / "workflows" / "api" / name).read_text())
        return api, next(n["inputs"] for n in api.values() if n["class_type"] == "SanaSampler")

    api, s = sampler("sana_1024_text_to_image.json")
    assert (s["sampler"], s["steps"], s["cfg"], s["pag_scale"]) == ("flow_dpm_solver", 20, 4.5, 2.0)
    api, s = sampler("sana_4096_tiled_decode.json")
    latent = next(n["inputs"] for n in api.values() if n["class_type"] == "SanaEmptyLatent")
    assert (latent["width"], latent["height"]) == (4096, 4096)
    assert any(n["class_type"] == "SanaVAEDecodeTiled" for n in api.values())
    api, s = sampler("sana_sprint_2_steps.json")
    assert (s["sampler"], s["steps"]) == ("scm", 2) and "negative" not in s
    api, s = sampler("sana_image_to_image.json")
    assert s["denoise"] == 0.6
    encode = next(i for i, n in api.items() if n["class_type"] == "SanaVAEEncode")
    assert s["latent_image"] == [encode, 0]
    assert api[api[encode]["inputs"]["pixels"][0]]["class_type"] == "LoadImage"
    api, s = sampler("sana_lora.json")
    lora = api[s["model"][0]]
    assert lora["class_type"] == "SanaLoraLoader" and lora["inputs"]["strength_model"] == 1.0
    assert api[lora["inputs"]["model"][0]]["class_type"] == "SanaModelLoader"

    api = json.loads((ROOT / "workflows" / "api" / "sana_controlnet_edges.json").read_text())
    ksampler = next(n["inputs"] for n in api.values() if n["class_type"] == "KSampler")
    apply = api[ksampler["positive"][0]]
    assert apply["class_type"] == "ControlNetApplyAdvanced" and ksampler["negative"] == [ksampler["positive"][0], 1]
    assert api[apply["inputs"]["control_net"][0]]["class_type"] == "SanaControlNetLoader"
    assert api[apply["inputs"]["vae"][0]]["class_type"] == "SanaVAELoader"
    canny = api[apply["inputs"]["image"][0]]
    assert canny["class_type"] == "Canny" and api[canny["inputs"]["image"][0]]["class_type"] == "LoadImage"
    note, = (n for n in json.loads((ROOT / "workflows" / "sana_controlnet_edges.json").read_text())["nodes"]
             if n["type"] == "MarkdownNote")
    assert "HED" in note["widgets_values"][0] and "Canny is a stand-in" in note["widgets_values"][0]
    for name, chain in (("sana_inpaint.json", ("SanaVAEEncode", "LoadImage")),
                        ("sana_outpaint.json", ("VAEEncode", "ImagePadForOutpaint", "LoadImage"))):
        api, s = sampler(name)  # the masked latent: encoded image + the mask of the node that made the image
        assert s["denoise"] == 1.0
        masked = api[s["latent_image"][0]]
        assert masked["class_type"] == "SetLatentNoiseMask"
        node = masked["inputs"]["samples"]
        for kind in chain:
            assert api[node[0]]["class_type"] == kind
            node = api[node[0]]["inputs"].get("pixels") or api[node[0]]["inputs"].get("image")
        image = api[masked["inputs"]["mask"][0]]
        assert masked["inputs"]["mask"][1] == 1 and image["class_type"] == chain[-2 if len(chain) > 2 else -1]
        composite = next(n["inputs"] for n in api.values() if n["class_type"] == "SanaInpaintComposite")
        assert composite["mask"] == masked["inputs"]["mask"] and composite["original"] == [masked["inputs"]["mask"][0], 0]


def _node(id_, type_, widgets, inputs=(), outputs=(), mode=0):
    return {"id": id_, "type": type_, "mode": mode, "widgets_values": widgets,
            "inputs": [{"name": n, "type": t, "link": l} for n, t, l in inputs],
            "outputs": [{"name": t, "type": t, "links": []} for t in outputs]}


def test_ui_to_api_positional_widgets_links_reroutes_and_bypass():
    ui = {"nodes": [
        _node(1, "SanaEmptyLatent", ["custom", 64, 96, 2], outputs=["LATENT"]),
        _node(2, "Reroute", [], inputs=[("", "*", 1)], outputs=["LATENT"]),
        _node(3, "SanaSampler", [7, "randomize", 3, 1.0, 0.0, 0.0, "flow_euler", 1.0],
              inputs=[("model", "SANA_MODEL", None), ("positive", "CONDITIONING", None),
                      ("latent_image", "LATENT", 2)], outputs=["LATENT"]),
        _node(4, "SanaVAEDecode", [], inputs=[("samples", "LATENT", 3), ("vae", "SANA_VAE", None)],
              outputs=["IMAGE"], mode=4),  # bypassed: passes its LATENT input on
        _node(5, "SaveImage", ["x"], inputs=[("images", "LATENT", 4)]),
        _node(6, "PreviewImage", [], inputs=[("images", "IMAGE", None)], mode=2),  # muted: dropped
        _node(7, "Note", ["just text"]),
    ], "links": [[1, 1, 0, 2, 0, "LATENT"], [2, 2, 0, 3, 2, "LATENT"], [3, 3, 0, 4, 0, "LATENT"],
                 [4, 4, 0, 5, 0, "LATENT"]]}
    api = ui_to_api(ui)
    assert set(api) == {"1", "3", "5"}
    assert api["1"]["inputs"] == {"preset": "custom", "width": 64, "height": 96, "batch_size": 2}
    assert api["3"]["inputs"] == {"latent_image": ["1", 0], "seed": 7, "steps": 3, "cfg": 1.0, "pag_scale": 0.0,
                                  "flow_shift": 0.0, "sampler": "flow_euler", "denoise": 1.0}
    assert api["5"]["inputs"] == {"images": ["3", 0], "filename_prefix": "x"}
    assert api["3"]["_meta"]["title"] == "SANA Sampler"
    with pytest.raises(WorkflowError, match="KSamplerAdvanced"):
        ui_to_api({"nodes": [_node(1, "KSamplerAdvanced", [])], "links": []})
