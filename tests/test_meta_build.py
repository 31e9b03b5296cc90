"""Modules built on the meta device without their initialisers (`checkpoints.components.meta_device_without_init`)
hold so only in the thread that builds them: a loader in one thread never leaves another thread's new modules
uninitialised, during its build or after it, however the builds of two threads overlap."""

from __future__ import annotations

import threading

import torch
from torch import nn

from sdlab.checkpoints.components import meta_device_without_init


def _fresh_linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(32, 128)


def test_meta_build_skips_the_initialisers_and_makes_meta_parameters():
    with meta_device_without_init():
        layers = nn.Sequential(nn.Linear(4, 8), nn.Conv2d(3, 5, 3), nn.Embedding(10, 4), nn.LayerNorm(4),
                               nn.MultiheadAttention(8, 2))
    assert all(p.is_meta for p in layers.parameters())
    with meta_device_without_init():   # an explicit CPU tensor inside is still initialised as asked
        cpu = torch.empty(3, device="cpu")
        nn.init.constant_(cpu, 2.0)
    assert torch.equal(cpu, torch.full((3,), 2.0))


def test_another_thread_s_modules_are_initialised_while_one_builds_on_meta():
    expected = _fresh_linear().state_dict()
    holding, release = threading.Event(), threading.Event()

    def build():
        with meta_device_without_init():
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=build)
    thread.start()
    try:
        holding.wait(10)
        made = _fresh_linear()
    finally:
        release.set()
        thread.join()
    assert made.weight.device.type == "cpu"
    for key, value in made.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_overlapping_builds_in_two_threads_leave_the_initialisers_as_they_were():
    """A enters, B enters, A leaves, B leaves: a patch of `torch.nn.init` shared by both threads would be put
    back by B as the no-op A had installed, and every later module would keep uninitialised (NaN) weights."""
    initialisers = {name: getattr(nn.init, name) for name in dir(nn.init) if name.endswith("_")}
    expected = _fresh_linear().state_dict()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():
        with meta_device_without_init():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def b():
        a_in.wait(10)
        with meta_device_without_init():
            b_in.set()
            a_out.wait(10)

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {name: getattr(nn.init, name) for name in initialisers} == initialisers
    made = _fresh_linear()
    for key, value in made.state_dict().items():
        assert torch.equal(value, expected[key]), key
