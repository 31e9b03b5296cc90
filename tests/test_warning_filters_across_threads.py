"""sdlab leaves Python's warning filters alone while it reads checkpoints and pictures. They are one list shared by
every thread, and `warnings.catch_warnings()` saves and puts back all of it: where two threads' holds overlap (A in,
B in, A out, B out) A takes away the filter B still relies on, and B puts back A's for good. The server reads
checkpoints, pictures and requests on several threads at once (the worker, `asyncio.to_thread`), so each test forces
that interleaving and checks the filters and what each call gave."""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdlab.checkpoints.io import LazyStateDict


class _Overlap:
    """Two threads, "A" and "B", each running a call that stops once inside its hold (`pause`), driven so that
    the holds overlap as A in, B in, A out, B out."""

    def __init__(self) -> None:
        self._inside = {name: threading.Event() for name in "AB"}
        self._go = {name: threading.Event() for name in "AB"}
        self.filters_inside: dict[str, list] = {}

    def pause(self) -> None:
        """Where the calling thread ("A" or "B") holds: note the filters it sees, then wait for its turn."""
        name = threading.current_thread().name
        self.filters_inside[name] = list(warnings.filters)
        self._inside[name].set()
        assert self._go[name].wait(10)

    def paused(self, real: Callable) -> Callable:
        """`real`, pausing first: a stand-in for a function the call runs inside its hold."""
        def stand_in(*args, **kwargs):
            if threading.current_thread().name in self._inside:
                self.pause()
            return real(*args, **kwargs)
        return stand_in

    def run(self, a: Callable[[], object], b: Callable[[], object]) -> dict[str, object]:
        """What `a` and `b` returned (or raised), by thread name."""
        outcome: dict[str, object] = {}

        def body(call: Callable[[], object]) -> None:
            try:
                outcome[threading.current_thread().name] = call()
            except Exception as err:
                outcome[threading.current_thread().name] = err

        threads = {name: threading.Thread(target=body, args=(call,), name=name) for name, call in zip("AB", (a, b))}
        threads["A"].start()
        assert self._inside["A"].wait(10)
        threads["B"].start()
        assert self._inside["B"].wait(10)
        self._go["A"].set()
        threads["A"].join(10)
        self._go["B"].set()
        threads["B"].join(10)
        return outcome


def test_overlapping_dtype_conversions_leave_the_warning_filters_as_they_were(tmp_path: Path, monkeypatch):
    """`LazyStateDict.read_as` in two threads (a model load, a preview decoder's): no read adds a filter, nor
    leaves one (an "ignore UserWarning" left on would hide every later UserWarning of the process)."""
    weight = torch.randn(64, 33, generator=torch.Generator().manual_seed(0)).half()
    path = tmp_path / "w.safetensors"
    save_file({"w": weight}, str(path))
    written = path.read_bytes()
    lazy = LazyStateDict(path)
    before = list(warnings.filters)
    overlap = _Overlap()
    monkeypatch.setattr(torch, "frombuffer", overlap.paused(torch.frombuffer))
    read = lambda: lazy.read_as("w", torch.bfloat16)   # noqa: E731
    outcome = overlap.run(read, read)
    assert warnings.filters == before
    assert overlap.filters_inside == {"A": before, "B": before}
    for got in outcome.values():
        assert isinstance(got, torch.Tensor) and torch.equal(got, weight.to(torch.bfloat16))
    assert path.read_bytes() == written   # the private map is never written, nor is the file through it


def test_overlapping_picture_opens_each_refuse_a_decompression_bomb(monkeypatch):
    """`open_image` in two threads (two requests' pictures): each refuses a picture past Pillow's pixel limit, however
    their header reads overlap (with the warning turned into an error by a filter, A's leaving put the filters back
    as they were before A, without B's, so B's picture opened), and the filters stay as they were."""
    from PIL import Image

    from sdlab.pipeline import images
    from sdlab.pipeline.images import ImageTooLargeError, open_image

    picture = io.BytesIO()
    Image.new("RGB", (40, 40)).save(picture, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # 1600 pixels: past the limit, within Pillow's error at 2x
    before = list(warnings.filters)
    overlap = _Overlap()
    monkeypatch.setattr(images, "declared_pixels", overlap.paused(images.declared_pixels))

    def size() -> tuple[int, int]:
        with open_image(io.BytesIO(picture.getvalue())) as image:
            return image.size

    outcome = overlap.run(size, size)
    assert {name: type(got) for name, got in outcome.items()} == {"A": ImageTooLargeError, "B": ImageTooLargeError}
    assert "too large to open safely" in str(outcome["B"])
    assert warnings.filters == before
    assert overlap.filters_inside == {"A": before, "B": before}


def test_a_pickle_read_overlapping_another_thread_s_filter_leaves_the_filters_as_they_were(tmp_path: Path,
                                                                                           monkeypatch):
    """Another thread's `catch_warnings` hold (A: its own filter) overlapping the unpickling of a `.ckpt` (B, a
    model load): B never saves and puts back the filters, so A's filter is not put back by B after A left."""
    from sdlab.checkpoints.io import read_checkpoint

    weight = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "old.ckpt"   # torch's legacy (not zip) format, pickle protocol 3: torch.load reads it, warning of it
    torch.save({"state_dict": {"w": weight}}, path, _use_new_zipfile_serialization=False, pickle_protocol=3)
    assert torch.equal(read_checkpoint(path)[0]["w"], weight)   # a read alone first, then one more, recorded:
    with warnings.catch_warnings(record=True) as shown:      # torch's pickle-protocol notice is filtered out
        read_checkpoint(path)
    assert [str(w.message) for w in shown] == []
    before = list(warnings.filters)
    overlap = _Overlap()
    monkeypatch.setattr(torch, "load", overlap.paused(torch.load))

    def other_code() -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="a filter of other code, for its hold only")
            overlap.pause()

    outcome = overlap.run(other_code, lambda: read_checkpoint(path)[0])
    assert outcome["A"] is None and torch.equal(outcome["B"]["w"], weight)
    assert warnings.filters == before
    assert overlap.filters_inside["B"] == overlap.filters_inside["A"]   # B added none of its own


def test_the_pickle_notice_stays_filtered_after_a_later_catch_all_filter(tmp_path: Path):
    """A `.ckpt` of pickle protocol 3 read once (the notice's filter added), then ``warnings.simplefilter("default")``
    (``python -W default``, an application's own set-up) put in front of it: the next read's unpickling finds the
    filter no longer the first to match the notice and puts it back in front, so the notice stays out; other
    warnings still meet the "default" filter. Before, it found the filter in the list and left it behind."""
    from sdlab.checkpoints.io import read_checkpoint

    weight = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"w": weight}}, path, _use_new_zipfile_serialization=False, pickle_protocol=3)
    with warnings.catch_warnings(record=True) as shown:
        read_checkpoint(path)
        warnings.simplefilter("default")
        assert torch.equal(read_checkpoint(path)[0]["w"], weight)
        warnings.warn("another warning", UserWarning)
    assert [str(w.message) for w in shown] == ["another warning"]
