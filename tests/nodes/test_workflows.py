"""The shipped workflows match the node definitions, so a rename cannot silently break them.

API-format files (workflows/api/) and UI-format files (workflows/) are read and checked against each
node's INPUT_TYPES / RETURN_TYPES: node types exist, input names exist and required ones are given,
links point at outputs of the right type, widget values are valid (combo members, numeric ranges), and
UI widget values come in the order the frontend derives from INPUT_TYPES. The two formats of a
workflow describe the same graph.

A workflow saved before a node gained inputs holds fewer widget values than the node has widgets: the
frontend gives the widgets after the saved values their defaults, and an API prompt that leaves out an
optional input runs with the function's default. So new inputs go at the end, as optional inputs with
defaults (a value list shorter than the widgets is accepted only then), and the saved values keep their
positions.
"""
import json

import pytest

from conftest import ROOT

WORKFLOWS = ROOT / "workflows"
# ComfyUI core nodes the shipped workflows use (their definitions live in ComfyUI itself).
CORE_NODES = {"CreateVideo", "SaveVideo", "LoadImage", "LoadVideo", "GetVideoComponents", "PreviewAny",
              "KSampler", "LoraLoaderModelOnly", "EasyCache", "ModelSamplingSD3"}  # the last four: the native route's
# Nodes of the UI only (notes for the user): the frontend leaves them out of the API prompt.
UI_ONLY_NODES = {"Note", "MarkdownNote"}
# Combos whose options are the files on the user's disk: any value is accepted here.
FILE_COMBOS = {"model", "lora_name", "motion_module", "personalized"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def api_files():
    return sorted((WORKFLOWS / "api").glob("*.json"))


def ui_files():
    return sorted(WORKFLOWS.glob("*.json"))


def input_specs(cls):
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}, set(spec.get("required", {}))


def is_widget(spec):
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def check_value(node_type, name, spec, value):
    kind, options = spec[0], spec[1] if len(spec) > 1 else {}
    where = f"{node_type}.{name} = {value!r}"
    if isinstance(kind, list):
        assert name in FILE_COMBOS or value in kind, f"{where} is not one of {kind}"
    elif kind == "INT":
        assert isinstance(value, int) and options.get("min", value) <= value <= options.get("max", value), where
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and options.get("min", value) <= value <= options.get("max", value), where
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where
    elif kind == "STRING":
        assert isinstance(value, str), where


def test_every_workflow_comes_in_both_formats():
    assert [p.name for p in api_files()] == [p.name for p in ui_files()]
    assert len(api_files()) >= 5


@pytest.mark.parametrize("path", api_files(), ids=lambda p: p.name)
def test_api_workflow_matches_node_definitions(pack, path):
    mapping = pack.nodes.NODE_CLASS_MAPPINGS
    graph = json.loads(path.read_text())
    for node_id, node in graph.items():
        node_type = node["class_type"]
        if node_type in CORE_NODES:
            continue
        assert node_type in mapping, f"{path.name}: node {node_id} has unknown type {node_type}"
        specs, required = input_specs(mapping[node_type])
        given = node["inputs"]
        assert not set(given) - set(specs), f"{path.name}: {node_type} has no inputs {set(given) - set(specs)}"
        assert not required - set(given), f"{path.name}: {node_type} misses required inputs {required - set(given)}"
        for name, value in given.items():
            if isinstance(value, list):  # a link [source node, output index]
                source = graph[value[0]]
                if source["class_type"] in mapping:
                    produced = mapping[source["class_type"]].RETURN_TYPES[value[1]]
                    assert produced == specs[name][0], f"{path.name}: {node_type}.{name} gets {produced}"
            else:
                check_value(node_type, name, specs[name], value)


def ui_widget_names(cls):
    """Widget inputs in the frontend's order: required then optional, with the seed's control value after it."""
    names = []
    for section in ("required", "optional"):
        for name, spec in cls.INPUT_TYPES().get(section, {}).items():
            if is_widget(spec):
                names.append(name)
                if len(spec) > 1 and spec[1].get("control_after_generate"):
                    names.append(f"{name}:control")
    return names


@pytest.mark.parametrize("path", ui_files(), ids=lambda p: p.name)
def test_ui_workflow_matches_node_definitions_and_its_api_twin(pack, path):
    mapping = pack.nodes.NODE_CLASS_MAPPINGS
    ui = json.loads(path.read_text())
    api = json.loads((WORKFLOWS / "api" / path.name).read_text())
    types = {str(n["id"]): n["type"] for n in ui["nodes"]}
    assert sorted(t for t in types.values() if t not in UI_ONLY_NODES) == sorted(n["class_type"] for n in api.values())
    assert all(types.get(node_id) == node["class_type"] for node_id, node in api.items()), f"{path.name}: node ids differ"
    for node in ui["nodes"]:
        node_type = node["type"]
        if node_type in CORE_NODES or node_type in UI_ONLY_NODES:
            continue
        cls = mapping[node_type]
        specs, _ = input_specs(cls)
        names = ui_widget_names(cls)
        values = node.get("widgets_values", [])
        assert len(values) <= len(names), f"{path.name}: {node_type} widgets {values} do not fit {names}"
        optional = cls.INPUT_TYPES().get("optional", {})
        for missing in names[len(values):]:
            spec = optional.get(missing.split(":")[0])
            assert spec is not None and "default" in spec[1], \
                f"{path.name}: {node_type} has no saved value for {missing}, which is not an optional input with a default"
        widgets = dict(zip(names, values))
        for name, value in widgets.items():
            if name.endswith(":control"):
                assert value in ("fixed", "increment", "decrement", "randomize"), f"{path.name}: {node_type}.{name}"
            else:
                check_value(node_type, name, specs[name], value)
        # The same values as the API twin (same node id).
        api_inputs = api[str(node["id"])]["inputs"]
        for name, value in widgets.items():
            if name in api_inputs and not isinstance(api_inputs[name], list):
                assert api_inputs[name] == value, f"{path.name}: {node_type}.{name} differs between UI and API files"
    for link in ui["links"]:
        link_id, source, slot, target, _, link_type = link
        if types[str(source)] in mapping:
            # "*": the frontend types a link into a wildcard input (Preview Any) as "*".
            assert link_type in (mapping[types[str(source)]].RETURN_TYPES[slot], "*"), f"{path.name}: link {link_id}"
