"""LoRAs asked for in the prompt, A1111 style: ``<lora:NAME:WEIGHT>`` tags, found by name in LoRA folders
and merged into the model for one request, then taken out again exactly.

    a castle <lora:ink_style:0.8>              text encoders and U-Net at 0.8
    a castle <lora:ink_style:0.5:1>            text encoders at 0.5, U-Net at 1 (A1111's te / unet)
    a castle <lora:ink_style:te=0.5:unet=1>    the same with names; <lyco:...> is an alias of <lora:...>
    a castle <lora:ink_style:1:1:dyn=8>        plain LoRA modules merged with their first 8 ranks (4th positional too)

A dynamic rank (DyLoRA's ``dyn``) keeps the first N rows of each plain LoRA module's down and columns of its up
at the full rank's alpha / rank scale, as A1111's `lyco_helpers.rebuild_conventional` truncates them; other
kinds (LoHa, LoKr, a Tucker-core LoRA, full diffs) merge whole, as there.

`split_prompt_loras` takes the tags out of the text that is encoded, after the prompt's comments
(`prompt_syntax.strip_comments`: A1111 removes them first, so a tag in a comment is never applied); the
rest of the prompt, spaces included, is kept as written. Every other extra-network tag ``<KIND:...>``
(A1111's ``extra_networks.parse_prompt`` pattern) is taken out too and not applied, with one warning per
kind, as A1111 skips a kind it has no network for: only ``lora`` and its alias ``lyco`` are applied, in
A1111's lower case (``<LORA:...>`` is an unknown kind there). NAME is a file's stem: `find_lora` looks for
``NAME.safetensors`` (``.pt``, ``.ckpt``) in each folder and its subfolders, then for a ``.safetensors``
whose kohya ``ss_output_name`` is NAME; a NAME with "/" is a file's path under a folder, ComfyUI's lora_name
(``sub/NAME.safetensors``). Tags in the negative prompt are not LoRAs: A1111 reads extra
networks from the positive prompt only (processing.py: ``parse_extra_network_prompts`` parses
``self.prompts``), so a tag there stays text.

`LoraPatcher` applies a set of (file, text-encoder weight, U-Net weight) to a bundle's layers and restores
them, as A1111's Lora extension does: the original weight tensors are kept and put back (never
recomputed by subtraction, so the model returns bit for bit), and the merged tensors of the last set are
kept too, so the same set again costs no arithmetic, until `LoraPatcher.forget` or until the weights they
were computed from change (`apply_lora`, `load_state_dict`, an optimizer step, moving the model: the layers'
own tensors are kept with their version counters, which every in-place write bumps; a write through
``param.data``, which has a counter of its own, is not seen: call `forget` after one). Files are read once while
unchanged (path, size, mtime), the last few kept until `forget_read_loras`. The layers are shared by every
thread that draws with the bundle, so a run holds the patcher's lock from its first step to its last
(`LoraPatcher.using`), with or without LoRAs: runs on one bundle take turns, and no run ever sees another's
merged weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from sdlab.checkpoints.lora import bundle_lora_weights, load_lora_file, merged_layers
from sdlab.models.cpu_kernels import tensor_version
from sdlab.pipeline.prompt_syntax import strip_comments
from sdlab.pipeline.request import RequestError
from sdlab.utils.file_hashes import read_per_version, stat_version
from sdlab.utils.numbers import finite_float

logger = logging.getLogger(__name__)

__all__ = [
    "LORA_FOLDER_NAMES",
    "LORA_SUFFIXES",
    "LoraPatcher",
    "LoraTag",
    "LoraUse",
    "default_lora_dirs",
    "find_lora",
    "forget_read_loras",
    "lora_file_problem",
    "lora_to_merge",
    "patcher_for",
    "read_lora",
    "request_loras",
    "resolve_prompt_loras",
    "split_prompt_loras",
    "without_extra_networks",
    "without_merged_tags",
]

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
# A1111's models/Lora and models/LyCORIS (its Lora extension's --lyco-dir-backcompat, read since 1.5.1), ComfyUI's
# models/loras
LORA_FOLDER_NAMES = ("Lora", "LyCORIS", "loras")

# A1111's extra-network syntax (modules/extra_networks.py: ``re_extra_net``); the kinds applied are its Lora
# extension's, looked up by exact name (``extra_network_registry``)
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_LORA_KINDS = ("lora", "lyco")
_warned_kinds: set[str] = set()            # extra-network kinds already warned of (once each per process)


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:...>`` tag: the name, the text-encoder and U-Net weights, and the tag as written."""

    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0
    text: str = ""
    dyn: int | None = None


@dataclass(frozen=True)
class LoraUse:
    """A LoRA file to merge for a request: text-encoder and U-Net weights apart; `name` is what the
    infotext calls it (A1111: the tag's name)."""

    path: Path
    te_weight: float = 1.0
    unet_weight: float = 1.0
    name: str = ""
    dyn: int | None = None                       # dynamic rank: the first `dyn` ranks of plain LoRA modules


def _number(text: str, tag: str) -> float:
    message = (f"the LoRA tag {tag!r} has {text!r} where a weight goes: <lora:NAME:WEIGHT>, "
               "<lora:NAME:TE_WEIGHT:UNET_WEIGHT> or <lora:NAME:te=W:unet=W>, weights being numbers")
    return finite_float(text, ValueError, message, message)


def _parse_tag(match: re.Match) -> LoraTag:
    """A1111 extra_networks_lora.activate: name, then te (positional 1 or ``te=``, default 1), unet
    (positional 2 or ``unet=``, default te), dyn (positional 3 or ``dyn=``, an integer; none by default)."""
    tag = match.group(0)
    positional, named = [], {}
    for item in match.group(2).split(":"):
        key, eq, value = item.partition("=")
        if eq and key.strip():
            named[key.strip().lower()] = value.strip()
        else:
            positional.append(item.strip())
    if not positional or not positional[0]:
        raise ValueError(f"the LoRA tag {tag!r} has no name: <lora:NAME:WEIGHT>")
    name = positional[0]
    te = _number(named.get("te", positional[1] if len(positional) > 1 else "1"), tag)
    unet = _number(named.get("unet", positional[2] if len(positional) > 2 else str(te)), tag)
    dyn = named.get("dyn", positional[3] if len(positional) > 3 else None)
    if dyn is not None:
        try:
            dyn = int(dyn)
        except ValueError:
            raise ValueError(f"the LoRA tag {tag!r} has {dyn!r} where the dynamic rank goes: dyn=N, a whole "
                             "number") from None
        if dyn < 0:
            raise ValueError(f"the LoRA tag {tag!r} has a negative dynamic rank {dyn}")
    return LoraTag(name, te, unet, tag, dyn)


def split_prompt_loras(prompt: str) -> tuple[str, list[LoraTag]]:
    """(`prompt` without its comments and its extra-network tags, its ``<lora:...>`` / ``<lyco:...>`` tags in
    order); a tag of another kind is not applied, with a warning (module docstring). A LoRA tag without a
    name or with a weight that is not a number is a ValueError naming it."""
    prompt = strip_comments(prompt)
    tags = []
    for match in _EXTRA_NETWORK.finditer(prompt):
        if match.group(1) in _LORA_KINDS:
            tags.append(_parse_tag(match))
        else:
            _warn_unapplied(match.group(1), match.group(0))
    return _EXTRA_NETWORK.sub("", prompt), tags


def without_extra_networks(prompt: str) -> str:
    """`prompt` without its comments and its extra-network tags, none applied: A1111's
    ``disable_extra_networks``, which still takes the tags out of the text."""
    return _EXTRA_NETWORK.sub("", strip_comments(prompt))


def _warn_unapplied(kind: str, tag: str) -> None:
    if kind not in _warned_kinds:
        _warned_kinds.add(kind)
        logger.warning("%s: extra networks of the kind %r are not applied (sdlab applies <lora:...> and "
                       "<lyco:...>, in lower case as A1111 reads them); such tags are left out of the prompt",
                       tag, kind)


def without_merged_tags(prompt: str, merged: Mapping[str, float]) -> tuple[str, str]:
    """(the prompt the pipeline draws, the prompt to record) when the LoRAs `merged` (name -> weight) are
    merged at load (`--lora`, the native API's `loras`): a tag of one of them is left out of the drawn prompt
    (the load's weight wins, the LoRA is not merged twice) and, where its weights differ from that weight,
    out of the recorded one too (the parameters then tag it at the weight it was drawn with). Both are the
    prompt without its comments (`strip_comments`, as the pipeline and the parameters read it), so a tag left
    out is the one that applies, never a commented-out copy of it. A bad tag is a ValueError."""
    drawn = recorded = strip_comments(prompt)
    for tag in split_prompt_loras(drawn)[1]:
        if tag.name in merged:
            drawn = drawn.replace(tag.text, "", 1)
            if (tag.te_weight, tag.unet_weight) != (merged[tag.name],) * 2:
                recorded = recorded.replace(tag.text, "", 1)
    return drawn, recorded


def _plain_name(name: str) -> bool:
    return not any(sep in name for sep in ("/", "\\", "\0")) and name not in (".", "..")


def _ss_output_name(path: Path) -> str | None:
    from sdlab.pipeline.png_info import safetensors_metadata

    try:
        return safetensors_metadata(path).get("ss_output_name")
    except (OSError, ValueError):
        return None


def find_lora(name: str, folders: Iterable[str | os.PathLike[str]], *, recursive: bool = True) -> Path | None:
    """The file `name` means in `folders` (in order): NAME.safetensors / .pt / .ckpt in a folder, then
    (`recursive`) in its subfolders (sorted), then a .safetensors whose ``ss_output_name`` is NAME; None if
    there is none. A name with "/" is ComfyUI's lora_name, a file's path under a folder with its suffix
    ("b/inked.safetensors": `sdlab serve` records a LoRA so where an earlier file has its stem), looked for under
    each folder (`recursive` only); any other path ("..", absolute, a backslash, no LoRA suffix) is a ValueError."""
    folders = [Path(f) for f in folders]
    if not _plain_name(name):
        return _path_under(name, folders if recursive else [])
    for folder in folders:
        for suffix in LORA_SUFFIXES:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    if not recursive:
        return None
    for folder in folders:
        if folder.is_dir():
            found = sorted(p for p in folder.rglob(f"{_glob_escape(name)}.*")
                           if p.suffix.lower() in LORA_SUFFIXES and p.stem == name and p.is_file())
            if found:
                return found[0]
    for folder in folders:
        if folder.is_dir():
            for path in sorted(folder.rglob("*.safetensors")):
                if path.is_file() and _ss_output_name(path) == name:
                    return path
    return None


def _path_under(name: str, folders: list[Path]) -> Path | None:
    """The file `name` ("sub/x.safetensors", a path under a LoRA folder with its suffix) names in the first of
    `folders` holding it, never a file outside the folder; a ValueError where `name` is no such path."""
    parts = name.split("/")
    if ("\\" in name or "\0" in name or any(part in ("", ".", "..") for part in parts)
            or Path(name).suffix.lower() not in LORA_SUFFIXES):
        raise ValueError(f"the LoRA name {name!r} is not a plain file name nor a file's path under a LoRA folder "
                         "(sub/NAME.safetensors)")
    for folder in folders:
        path = folder / name
        if path.is_file() and path.resolve().is_relative_to(folder.resolve()):
            return path
    return None


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def default_lora_dirs(model: str | os.PathLike[str] | None) -> list[Path]:
    """Where A1111 / ComfyUI users keep LoRAs for `model`: ``Lora`` / ``LyCORIS`` / ``loras`` beside the model's
    folder (``models/Stable-diffusion/x.safetensors`` -> ``models/Lora``) and inside it; those that exist."""
    if model is None:
        return []
    folder = Path(model).resolve().parent
    candidates = [base / name for base in (folder.parent, folder) for name in LORA_FOLDER_NAMES]
    return [c for c in dict.fromkeys(candidates) if c.is_dir()]


# --- reading, cached ----------------------------------------------------------------------------------

_FILE_CACHE: OrderedDict[tuple, dict[str, dict[str, Tensor]]] = OrderedDict()
_FILE_CACHE_SIZE = 8
_FILE_CACHE_LOCK = threading.Lock()        # a server reads tags as jobs are submitted, beside the worker


def _file_key(path: Path) -> tuple:
    """The file at `path` in this version of it (`file_hashes.stat_version`)."""
    return (str(path.resolve()), *stat_version(path.stat()))


def read_lora(path: str | os.PathLike[str]) -> dict[str, dict[str, Tensor]]:
    """`load_lora_file(path)`, kept while the file is unchanged (the last few files)."""
    key = _file_key(Path(path))
    lora = _kept_lora(key)
    if lora is not None:
        return lora
    lora = load_lora_file(path)
    with _FILE_CACHE_LOCK:
        _FILE_CACHE[key] = lora
        while len(_FILE_CACHE) > _FILE_CACHE_SIZE:
            _FILE_CACHE.popitem(last=False)
    return lora


def lora_to_merge(path: str | os.PathLike[str]) -> dict[str, dict[str, Tensor]]:
    """The LoRA file at `path` for a merge for good (`api.load`'s `loras`): the read `read_lora` keeps of this
    version of it where there is one (a server job's submit check read it: `lora_file_problem`), else
    `load_lora_file(path)` read now and not kept, so its tensors go with the caller's."""
    try:
        key = _file_key(Path(path))
    except OSError:                                     # load_lora_file names what is wrong with the path
        return load_lora_file(path)
    lora = _kept_lora(key)
    return load_lora_file(path) if lora is None else lora


def _kept_lora(key: tuple) -> dict[str, dict[str, Tensor]] | None:
    with _FILE_CACHE_LOCK:
        if key not in _FILE_CACHE:
            return None
        _FILE_CACHE.move_to_end(key)
        return _FILE_CACHE[key]


def lora_file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the file at `path` is no LoRA sdlab merges (the error `read_lora` raises, one line naming the file:
    not a LoRA, a kind sdlab does not merge, NaN or infinite weights, unreadable), None for one it merges. The
    answer is kept per version of the file (`read_per_version`): a file checked again unchanged is not read
    again, after `forget_read_loras` too. The check for a prompt's tags and a server job's `loras` entries."""
    return read_per_version(path, _read_problem)


def _read_problem(path: Path) -> str | None:
    try:
        read_lora(path)                                  # kept for the run that merges it
    except Exception as err:                             # CheckpointError, OSError: one line naming the file
        return str(err)
    return None


def forget_read_loras() -> None:
    """Let go the LoRA files `read_lora` keeps (the next read of each reads its file again)."""
    with _FILE_CACHE_LOCK:
        _FILE_CACHE.clear()


def resolve_prompt_loras(prompt: str, find: Callable[[str], Path | None] | Sequence[str | os.PathLike[str]],
                         field: str = "prompt") -> tuple[str, list[LoraUse]]:
    """(the prompt without its LoRA tags, the files to merge): every tag looked up (`find` is a function
    of the name or a list of folders for `find_lora`) and its file read, so that a missing name or a file
    that is not a LoRA is one `RequestError` before any work, naming the `field` the tag is in ("hires
    prompt"). A name tagged twice is merged twice, both
    times at its last tag's weights, as A1111 does: `networks.load_networks` gets the same `Network` object
    for each tag of a name, sets its multipliers from each tag in turn (the last one stays) and appends it to
    `loaded_networks` once per tag, and every entry there is merged (``<lora:a:0.5> <lora:a:0.3>``: a plain
    LoRA changes the model by 2 * 0.3, not 0.5 or 0.8). Prompts written for A1111 draw as they did there."""
    try:
        bare, tags = split_prompt_loras(prompt)
    except ValueError as err:
        raise RequestError(str(err)) from None
    if not tags:
        return bare, []
    lookup = find if callable(find) else (lambda name: find_lora(name, find))
    last = {tag.name: tag for tag in tags}                  # a name's weights: its last tag's (A1111)
    paths: dict[str, Path] = {}
    uses: list[LoraUse] = []
    for tag in tags:
        if tag.name in paths:
            uses.append(LoraUse(paths[tag.name], last[tag.name].te_weight, last[tag.name].unet_weight, tag.name,
                                last[tag.name].dyn))
            continue
        try:
            path = lookup(tag.name)
        except ValueError as err:
            raise RequestError(str(err)) from None
        if path is None:
            where = ", ".join(str(f) for f in find) if not callable(find) else "the LoRA folder"
            raise RequestError(f"the {field} asks for the LoRA {tag.text} but there is no {tag.name}"
                               f"{'/'.join(LORA_SUFFIXES)} in {where or 'no folder (pass --lora-dir DIR)'}")
        problem = lora_file_problem(path)
        if problem is not None:
            raise RequestError(f"{tag.text}: {problem}")
        paths[tag.name] = Path(path)
        uses.append(LoraUse(Path(path), last[tag.name].te_weight, last[tag.name].unet_weight, tag.name,
                            last[tag.name].dyn))
    return bare, uses


def request_loras(prompt: str, negative_prompt: str,
                  find: Callable[[str], Path | None] | Sequence[str | os.PathLike[str]]) -> tuple[str, list[LoraUse]]:
    """`resolve_prompt_loras` of a request's prompt; tags in the negative prompt stay text (A1111), with a
    warning."""
    if isinstance(negative_prompt, str):
        tags = [m.group(0) for m in _EXTRA_NETWORK.finditer(negative_prompt) if m.group(1) in _LORA_KINDS]
        if tags:
            logger.warning("LoRA tags in the negative prompt are not applied (as in A1111): %s", ", ".join(tags))
    return resolve_prompt_loras(prompt, find)


# --- applying and restoring ---------------------------------------------------------------------------


def _use_key(uses: Sequence[LoraUse]) -> tuple:
    return tuple((_file_key(u.path), u.te_weight, u.unet_weight, u.dyn) for u in uses)


def with_dynamic_rank(modules: Mapping[str, Mapping[str, Tensor]], dyn: int | None) -> Mapping[str, Mapping[str, Tensor]]:
    """`modules` with each plain LoRA module (down and up, no Tucker core) cut to its first `dyn` ranks, its alpha
    scaled so that the merge keeps the full rank's scale alpha / r (1 without an alpha), as A1111 merges a
    ``dyn`` tag (`lyco_helpers.rebuild_conventional`: ``up[:, :dyn] @ down[:dyn]``, times ``alpha / r``). At
    ``dyn=0`` such a module keeps rank 0: its update is zero, as A1111's ``up[:, :0] @ down[:0]`` (the layer
    stays as it is, but for a DoRA module's renormalisation), and the file still has to fit the model. Other
    modules, and all of them without `dyn`, are as given."""
    if dyn is None:
        return modules
    cut = {}
    for name, module in modules.items():
        if "down" in module and "up" in module and "mid" not in module:
            rank = module["down"].shape[0]                                          # down (r, in[, kh, kw])
            kept = min(dyn, rank)
            module = {**module, "down": module["down"][:kept], "up": module["up"][:, :kept]}  # up (out, r[, 1, 1])
            if kept:
                alpha = float(module["alpha"]) if "alpha" in module else float(rank)
                module["alpha"] = torch.tensor(alpha * kept / rank)
            else:
                module.pop("alpha", None)                   # a zero update: no alpha / 0 to scale it by
        cut[name] = module
    return cut


def _base(param: nn.Parameter) -> tuple[Tensor, int | None]:
    """The layer's own tensor and its version counter, as a merge computed from it now sees them."""
    return param.data, tensor_version(param)


def _unchanged(param: nn.Parameter, base: tuple[Tensor, int | None]) -> bool:
    """Whether `param` still holds the tensor of `base`, not written since: the same memory (the kept tensor
    keeps its address from being reused) and the same version (an inference tensor has none: never sure)."""
    kept, version = base
    return version is not None and param.data_ptr() == kept.data_ptr() and tensor_version(param) == version


@dataclass
class _MergedSet:
    """The merged tensors of a set (`key`) and the layers' own tensors they were computed from."""

    key: tuple
    tensors: dict[nn.Parameter, Tensor]
    bases: dict[nn.Parameter, tuple[Tensor, int | None]]

    def fits(self, key: tuple) -> bool:
        return key == self.key and all(_unchanged(param, base) for param, base in self.bases.items())


class LoraPatcher:
    """Swaps merged weights into a bundle's layers and the originals back (see the module docstring). It
    holds the bundle weakly: `patcher_for`'s table keeps a patcher only while the bundle's U-Net lives, so
    the patcher must not keep the bundle (and its U-Net) alive itself."""

    def __init__(self, bundle) -> None:
        self._bundle = weakref.ref(bundle)
        self.lock = threading.RLock()                         # held by whoever uses or swaps the layers
        self._originals: dict[nn.Parameter, Tensor] = {}    # the layers' own tensors while patched
        self._applied: tuple | None = None                    # the key of the set now in the layers
        self._cached: _MergedSet | None = None                # the last set's merged tensors

    @property
    def bundle(self):
        """The bundle, or None once nothing else holds it."""
        return self._bundle()

    @property
    def applied(self) -> bool:
        return self._applied is not None

    def _merged(self, uses: Sequence[LoraUse]) -> dict[nn.Parameter, Tensor]:
        merges = None
        for use in uses:
            try:
                merges, _ = bundle_lora_weights(self.bundle, use.path, with_dynamic_rank(read_lora(use.path), use.dyn),
                                                use.te_weight, use.unet_weight, merges)
            except Exception as err:
                raise RequestError(f"LoRA {use.name or use.path}: {err}") from None
        tensors: dict[nn.Parameter, Tensor] = {}
        for layer, weight, bias in merged_layers(merges or {}):
            tensors[layer.weight] = weight.to(layer.weight.device, layer.weight.dtype)
            if bias is not None:
                tensors[layer.bias] = bias.to(layer.bias.device, layer.bias.dtype)
        return tensors

    def apply(self, uses: Sequence[LoraUse]) -> None:
        """Put the set `uses` into the layers (restoring any other set first); nothing when it is there."""
        with self.lock:
            key = _use_key(uses)
            if key == self._applied:
                return
            self.restore()
            if not uses:
                return
            if self._cached is not None and self._cached.fits(key):
                tensors = self._cached.tensors
            else:
                self._cached = None                               # free the old set before computing the new
                tensors = self._merged(uses)
                self._cached = _MergedSet(key, tensors, {param: _base(param) for param in tensors})
            for param, tensor in tensors.items():
                self._originals[param] = param.data
                param.data = tensor
            self._applied = key
            logger.info("LoRAs applied: %s",
                        ", ".join(f"{u.name or u.path}:{u.te_weight:g}:{u.unet_weight:g}" for u in uses))

    def forget(self) -> None:
        """Let go the merged tensors kept for the last set (its next `apply` computes them again); the layers
        keep what is in them now. Needed only after a write the version counters miss (``param.data.copy_``)."""
        with self.lock:
            self._cached = None

    def restore(self) -> None:
        """Put the layers' own tensors back (a no-op when nothing is applied)."""
        with self.lock:
            for param, original in self._originals.items():
                param.data = original.to(param.device, param.dtype)
            self._originals.clear()
            self._applied = None

    @contextlib.contextmanager
    def own_weights(self, params: set[nn.Parameter]) -> Iterator[None]:
        """The layers' own tensors back in those of `params` the applied set changed, for the block; the set's
        tensors again after it."""
        with self.lock:
            merged = {param: param.data for param in self._originals if param in params}
            for param in merged:
                param.data = self._originals[param]
            try:
                yield
            finally:
                for param, tensor in merged.items():
                    param.data = tensor

    @contextlib.contextmanager
    def using(self, uses: Sequence[LoraUse]) -> Iterator[None]:
        """The set `uses` (none: the model's own weights) in the layers for the block, the model's own weights
        after it (even on error). The block holds the lock: another thread's `using` waits for it to end."""
        with self.lock:
            self.apply(uses)
            try:
                yield
            finally:
                self.restore()


_PATCHERS: weakref.WeakKeyDictionary[nn.Module, LoraPatcher] = weakref.WeakKeyDictionary()
_PATCHERS_LOCK = threading.Lock()          # two threads' first runs on a bundle get the same patcher


@contextlib.contextmanager
def without_prompt_loras(modules: Iterable[nn.Module]) -> Iterator[None]:
    """The modules' own weights for the block where a prompt's LoRAs are merged into them (`LoraPatcher.own_weights`
    of the patchers that changed them), the LoRAs back after it."""
    params = {param for module in modules for param in module.parameters()}
    with _PATCHERS_LOCK:
        patchers = [patcher for patcher in _PATCHERS.values() if not params.isdisjoint(patcher._originals)]
    with contextlib.ExitStack() as stack:
        for patcher in patchers:
            stack.enter_context(patcher.own_weights(params))
        yield


def patcher_for(bundle) -> LoraPatcher:
    """The one `LoraPatcher` of `bundle` (kept while its U-Net lives)."""
    with _PATCHERS_LOCK:
        patcher = _PATCHERS.get(bundle.unet)
        if patcher is None or patcher.bundle is not bundle:
            patcher = _PATCHERS[bundle.unet] = LoraPatcher(bundle)
        return patcher
