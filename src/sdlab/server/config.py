"""What a server is started with: where models and outputs live, who may use it, and its limits."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine's loopback: localhost, 127.0.0.0/8, ::1."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bare_host(name: str) -> str:
    """A host name as the Host and Origin rules compare it: lower case, without one trailing dot (`localhost.` is
    the fully qualified `localhost`, which browsers send as typed)."""
    return name.lower().removesuffix(".")


@dataclass(frozen=True)
class Limits:
    """Per-request limits; a request past one is refused with a 4xx that names it."""

    max_body_bytes: int = 50 << 20          # a 2048x2048 PNG as base64 is ~16 MiB
    max_pixels: int = 2048 * 2048           # width x height of one picture
    max_steps: int = 150
    max_batch: int = 8                      # pictures drawn together (A1111's batch_size; its n_iter
                                            # batches are drawn one after another)
    max_images: int = 100                   # pictures of one request, every batch's (batch_size x n_iter)


@dataclass(frozen=True)
class ServerConfig:
    output_dir: Path
    model: Path | None = None               # the model loaded first (None: the shipped model)
    models_dir: Path | None = None          # checkpoints a client may switch to; LoRAs in its Lora/ or loras/
    embeddings_dir: Path | None = None      # textual-inversion embeddings, words of every prompt
    controlnet_dir: Path | None = None      # ControlNets a request may name
    upscalers_dir: Path | None = None       # upscaler models the hires fix and extra-single-image may name
    realesrgan_dir: Path | None = None      # A1111's models/RealESRGAN: the files of its R-ESRGAN names, as well
    vae_dir: Path | None = None             # VAE files sd_vae may name (beside the models folder's sidecars)
    styles_files: tuple[str, ...] = ()      # A1111's styles.csv files (patterns too) a request's `styles` names
    styles_candidates: tuple[str, ...] = () # with no styles_files: the styles.csv paths watched, the first made read
    device: str = "cpu"
    max_queue: int = 16                     # jobs waiting (the running one not counted); more -> 429
    basic_auth: tuple[str, str] | None = None
    token: str | None = None
    limits: Limits = field(default_factory=Limits)
    host: str | None = None                 # the address `sdlab serve` listens on (None: the app is not served by it)
    allowed_hosts: tuple[str, ...] = ()     # more Host names a loopback server without auth answers, and names
                                            # whose pages may post to it ("*": any)

    def __post_init__(self) -> None:
        # a Python caller may name folders with strings, as `sdlab.load` takes them
        for name in ("output_dir", "model", "models_dir", "embeddings_dir", "controlnet_dir", "upscalers_dir",
                     "realesrgan_dir", "vae_dir"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, Path(value))

    @property
    def auth_enabled(self) -> bool:
        return self.basic_auth is not None or self.token is not None

    @property
    def host_names(self) -> frozenset[str] | None:
        """The Host names this server answers besides the loopback's (`is_loopback`: the name or address it
        listens on among them); None: any. A server listening on the loopback without auth answers no other, so
        that a web page on a name that resolves to 127.0.0.1 (DNS rebinding) cannot reach it. One with auth, on
        another address or not run by `sdlab serve` (`host` None: an app built in-process) answers any."""
        if self.host is None or self.auth_enabled or not is_loopback(self.host) or "*" in self.allowed_hosts:
            return None
        return frozenset(filter(None, map(bare_host, self.allowed_hosts)))

    @property
    def origin_names(self) -> frozenset[str] | None:
        """The names whose pages may send this server POST, PUT, PATCH and DELETE requests besides its own pages
        (an `Origin` of the Host asked for); None: any page. A browser sends another site's form, or a no-cors
        fetch, without asking the server first (CORS preflights only other requests), with the Basic credentials
        it holds for the server: so a server without auth, or with --auth, takes none from another page's origin
        (cross-site request forgery). A token alone a browser never sends unasked (another page is a 401); an app
        built in-process (`host` None) has no origin rule, as it has no Host rule."""
        if self.host is None or "*" in self.allowed_hosts or (self.basic_auth is None and self.token is not None):
            return None
        return frozenset(filter(None, map(bare_host, self.allowed_hosts)))
