"""`server.comfy_graph.check_graph` on graphs a client could send to hurt the server: many outputs, a deep chain,
a cycle, many bad nodes; and ComfyUI's conversion of values (`execution.validate_inputs`)."""

from __future__ import annotations

import copy
import json

import pytest

from sdlab.server.comfy_graph import Choices, GraphError, check_graph

BASIC = {    # comfyanonymous/ComfyUI script_examples/websockets_api_example.py's prompt_text
    "3": {"class_type": "KSampler", "inputs": {"cfg": 8, "denoise": 1, "latent_image": ["5", 0], "model": ["4", 0],
                                               "negative": ["7", 0], "positive": ["6", 0], "sampler_name": "euler",
                                               "scheduler": "normal", "seed": 8566257, "steps": 3}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "plain.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "height": 64, "width": 64}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "masterpiece best quality girl"}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "bad hands"}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}
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

