"""The import direction between sdlab's layers (DESIGN.md): a layer imports only the layers below it.

`models` and `diffusion` are siblings: networks know nothing about sigmas, samplers nothing about U-Nets.
`tiny` is the sdlab-tiny project (its datasets, evaluation, image tower and training helpers) built on the
core: it may import the core, the core never imports it, except the `sdlab eval` command (`cli/evaluate.py`).
The train CLI names the text task's module as a string (`TASK_MODULES`), so it imports nothing of `tiny`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "sdlab"

# layer -> sdlab layers it may import
ALLOWED: dict[str, set[str]] = {
    "utils": set(),
    "models": {"utils"},
    "diffusion": {"utils"},
    "families": {"models", "diffusion", "utils"},
    "checkpoints": {"families", "models", "diffusion", "utils"},
    "pipeline": {"checkpoints", "families", "diffusion", "models", "utils"},
    "train": {"pipeline", "checkpoints", "families", "diffusion", "models", "utils"},
    "api": {"pipeline", "checkpoints", "families", "diffusion", "models", "utils"},
    "server": {"api", "pipeline", "checkpoints", "families", "diffusion", "models", "utils"},
    "cli": {"api", "server", "pipeline", "checkpoints", "families", "train", "tiny", "utils"},
    "command": {"cli", "utils"},             # the console script: the command line as a process
    "__main__": {"command"},                 # `python -m sdlab` is the console script
    "tiny": {"api", "pipeline", "checkpoints", "families", "diffusion", "models", "train", "utils"},
}
# the only core files that may import sdlab.tiny (the layer table above allows the layer, this the file)
TINY_IMPORTERS = {"cli/evaluate.py"}
FORBIDDEN_AT_RUNTIME = {"diffusers", "transformers", "open_clip", "k_diffusion", "spandrel"}


def _layer_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem != "__init__" else "__init__"


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the file's package
                base = path.relative_to(SRC.parent).with_suffix("").parts[: -node.level]
                names.append(".".join(base + ((node.module,) if node.module else ())))
            elif node.module:
                names.append(node.module)
    return names


FILES = sorted(p for p in SRC.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_follow_the_layers(path: Path) -> None:
    layer = _layer_of(path)
    for name in _imports(path):
        top = name.split(".")[0]
        assert top not in FORBIDDEN_AT_RUNTIME, f"{path.name} imports the reference library {top}"
        if top != "sdlab" or layer == "__init__":
            continue
        parts = name.split(".")
        if len(parts) < 2:
            continue
        target = parts[1]
        if target == layer:
            continue
        assert target in ALLOWED.get(layer, set()), f"{layer}/{path.name} may not import sdlab.{target}"
        if target == "tiny":
            assert path.relative_to(SRC).as_posix() in TINY_IMPORTERS, f"{layer}/{path.name} may not import sdlab.tiny"


def test_the_command_line_starts_without_the_training_and_serving_code() -> None:
    """`sdlab txt2img` pays for what it uses: building the parser imports no training loop, training data
    or web server (they cost a few hundred ms of every process start)."""
    import subprocess
    import sys

    code = ("import sys, sdlab.cli as c; c.build_parser(); "
            "print(' '.join(m for m in ('sdlab.train.cli', 'sdlab.train.data', "
            "'sdlab.server', 'fastapi', 'uvicorn', 'sdlab.tiny') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
