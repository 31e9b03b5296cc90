"""`server.comfy_graph.check_graph` on graphs a client could send to hurt the server: many outputs, a deep chain,
a cycle, many bad nodes; and ComfyUI's conversion of values (`execution.validate_inputs`)."""

from __future__ import annotations

import copy
import json

import pytest

from sdlab.server.comfy_graph import Choices, GraphError, check_graph
from test_server_comfy_api import BASIC   # ComfyUI's websockets_api_example.py prompt_text

CHOICES = Choices(checkpoints=["plain.safetensors"], loras=[], input_images=[], samplers=["euler"])


def basic() -> dict:
    return copy.deepcopy(BASIC)


class CountedId(str):
    """A node id that counts its comparisons: a walk that looks ids up in a list compares each with all before it."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        CountedId.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self                             # check_graph's str(key) keeps the counting id


def test_many_outputs_are_walked_in_linear_time():
    graph = basic()
    n = 3000
    for i in range(n):
        graph[CountedId(f"p{i}")] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    CountedId.compared = 0
    plan = check_graph(graph, CHOICES)
    assert len(plan.outputs) == n + 1 and len(plan.order) == len(graph)
    assert CountedId.compared < 10 * n          # a list lookup per visit: n^2 / 2 = 4.5 million comparisons


def test_a_deep_chain_is_checked_without_recursion():
    graph = basic()
    previous = ["4", 1]
    for i in range(5000):                       # far past Python's recursion limit (1000)
        graph[f"c{i}"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": previous, "stop_at_clip_layer": -1}}
        previous = [f"c{i}", 0]
    graph["6"]["inputs"]["clip"] = previous
    graph["7"]["inputs"]["clip"] = previous
    try:
        plan = check_graph(graph, CHOICES)
    except GraphError as err:                   # checked; the drawing refuses the chain with ComfyUI's 400 shape
        body = err.body()
        assert body["error"]["type"] == "prompt_outputs_failed_validation"
        assert [e["type"] for node in body["node_errors"].values() for e in node["errors"]] == ["unsupported_graph"]
    else:
        assert plan.prompt == "masterpiece best quality girl"
    graph["c0"]["inputs"]["stop_at_clip_layer"] = 5             # an error at the far end of the chain is found
    with pytest.raises(GraphError) as caught:
        check_graph(graph, CHOICES)
    assert caught.value.node_errors["c0"]["errors"][0]["type"] == "value_bigger_than_max"


def test_a_cycle_and_a_self_link_name_their_nodes():
    graph = basic()
    graph["10"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["11", 0], "stop_at_clip_layer": -1}}
    graph["11"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["10", 0], "stop_at_clip_layer": -1}}
    graph["6"]["inputs"]["clip"] = ["10", 0]
    with pytest.raises(GraphError) as caught:
        check_graph(graph, CHOICES)
    assert list(caught.value.node_errors) == ["11"]
    error = caught.value.node_errors["11"]["errors"][0]
    assert (error["type"], error["details"]) == ("dependency_cycle_detected", "clip: node #10 depends on #11")
    assert "Dependency cycle detected: clip: node #10 depends on #11" in caught.value.error["details"]

    graph = basic()
    graph["10"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["10", 0], "stop_at_clip_layer": -1}}
    graph["6"]["inputs"]["clip"] = ["10", 0]
    with pytest.raises(GraphError) as caught:
        check_graph(graph, CHOICES)
    assert caught.value.node_errors["10"]["errors"][0]["details"] == "clip: node #10 depends on #10"


def test_many_bad_outputs_answer_in_proportion_to_the_request():
    n = 3000
    graph = {str(i): {"class_type": "PreviewImage", "inputs": {}} for i in range(n)}
    with pytest.raises(GraphError) as caught:
        check_graph(graph, CHOICES)
    answer = json.dumps(caught.value.body())
    assert len(caught.value.node_errors) == n
    assert all(len(node["dependent_outputs"]) <= 20 for node in caught.value.node_errors.values())
    assert len(answer) < 200 * len(json.dumps({"prompt": graph}))        # was n ids on each of n node errors


@pytest.mark.parametrize(("name", "value", "read"), [
    ("steps", "3", 3), ("steps", 3.0, 3), ("steps", 3.7, 3), ("seed", "123", 123), ("cfg", "7.5", 7.5),
    ("cfg", 7, 7.0), ("denoise", "1", 1.0), ("steps", True, 1)])
def test_values_are_converted_as_comfyui_converts_them(name, value, read):
    # comfyanonymous/ComfyUI execution.py validate_inputs (00a0995): int(val) / float(val) / str(val), stored back
    graph = basic()
    graph["3"]["inputs"][name] = value
    plan = check_graph(graph, CHOICES)
    got = {"steps": plan.steps, "seed": plan.seed, "cfg": plan.cfg_scale, "denoise": plan.strength}[name]
    assert got == read and type(got) is type(read)
    assert graph["3"]["inputs"][name] == read and type(graph["3"]["inputs"][name]) is type(read)


def test_a_text_is_converted_to_a_string():
    graph = basic()
    graph["6"]["inputs"]["text"] = 5
    assert check_graph(graph, CHOICES).prompt == "5"


@pytest.mark.parametrize(("name", "value", "kind"), [
    ("steps", "3.0", "invalid_input_type"), ("steps", "three", "invalid_input_type"),
    ("steps", None, "invalid_input_type"), ("steps", {"a": 1}, "invalid_input_type"),
    ("cfg", "x", "invalid_input_type"), ("cfg", "nan", "invalid_input_type"), ("cfg", "inf", "value_bigger_than_max"),
    ("steps", float("inf"), "invalid_input_type"), ("steps", "0", "value_smaller_than_min"),
    ("seed", "-1", "value_smaller_than_min")])
def test_what_comfyui_refuses_stays_refused(name, value, kind):
    graph = basic()
    graph["3"]["inputs"][name] = value
    with pytest.raises(GraphError) as caught:
        check_graph(graph, CHOICES)
    assert caught.value.node_errors["3"]["errors"][0]["type"] == kind
