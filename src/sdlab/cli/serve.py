"""`sdlab serve`: the HTTP API (A1111-compatible `/sdapi/v1` and the native `/api/jobs`) and the web UI.

    sdlab serve                                   # the shipped model on http://127.0.0.1:7860
    sdlab serve --models-dir ~/models --model ~/models/v1-5.safetensors --auth me:secret --host 0.0.0.0

Listening on any address but the loopback needs --auth or --token-file; without them only localhost, loopback
addresses and --allowed-hosts are answered as the Host (DNS rebinding). Unless a token alone guards it, a POST /
PUT / PATCH / DELETE from a web page of another origin than the server's or --allowed-hosts' is refused (cross-site
request forgery). docs/server.md has the routes.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from pathlib import Path

from sdlab.cli.errors import Terminated, UserError
from sdlab.utils.files import make_output_folder


def add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve the HTTP API and the web UI",
                              description="Serve an A1111-compatible HTTP API, a native async jobs API and a web UI.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only; "
                                                       "any other needs --auth or --token-file)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument("--allowed-hosts", metavar="NAME[,NAME...]", default="",
                   help="more Host names a loopback server without auth answers (a hosts-file alias, the name of a "
                        "proxy or a forwarded port; '*': any); else it answers only localhost, 127.0.0.1 and [::1], "
                        "against DNS rebinding. Pages of these names may also POST to it, as its own pages "
                        "(without auth or with --auth, other pages may not: cross-site request forgery)")
    p.add_argument("--model", help="checkpoint loaded first (default: the model shipped with sdlab)")
    p.add_argument("--models-dir", help="folder of checkpoints clients may switch to (LoRAs in its Lora/ folder)")
    p.add_argument("--embeddings-dir", help="textual-inversion embeddings (subfolders too); their file names are "
                                            "words of prompts")
    p.add_argument("--controlnet-dir", help="ControlNets requests may name (default: <models-dir>/ControlNet when "
                   "it exists)")
    p.add_argument("--upscalers-dir", help="upscaler models the hires fix and /sdapi/v1/extra-single-image may "
                   "name (default: <models-dir>/ESRGAN when it exists; A1111's R-ESRGAN files are found in "
                   "<models-dir>/RealESRGAN too)")
    p.add_argument("--vae-dir", help="VAE files A1111's sd_vae may name, beside the sidecar VAEs of --models-dir "
                   "(default: <models-dir>/VAE when it exists)")
    p.add_argument("--styles-file", action="append", default=[], metavar="FILE",
                   help="A1111's prompt styles (a styles.csv: name,prompt,negative_prompt) that requests name in "
                        "`styles`; a name with * or ? is a pattern in its folder; repeatable (default: styles.csv in "
                        "--models-dir, or beside it when --models-dir is A1111's models folder, if there is one)")
    p.add_argument("--output-dir", default="outputs", help="pictures (images/) and the job history database "
                                                           "(default ./outputs)")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--auth", metavar="USER:PASS", help="require HTTP Basic authentication on every route")
    auth.add_argument("--token-file", metavar="FILE", help="require 'Authorization: Bearer <token>' with the token in FILE")
    p.add_argument("--max-queue", type=int, default=16, help="jobs that may wait; more get HTTP 429 (default 16)")
    p.add_argument("--max-body-mb", type=float, default=50, help="largest request body in MiB (default 50)")
    p.add_argument("--max-pixels", type=int, default=2048 * 2048, help="largest width x height (default 2048x2048)")
    p.add_argument("--max-steps", type=int, default=150, help="most sampling steps per request (default 150)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="most images drawn together, a batch (default 8; A1111's n_iter batches run one after another)")
    p.add_argument("--max-images", type=int, default=100,
                   help="most images of one request, every batch's (A1111's batch_size x n_iter; default 100)")
    p.add_argument("--device", type=str.lower, default="cpu", help="cpu, cuda, cuda:1, mps, in any case (default cpu)")
    p.set_defaults(run=run_serve)


def _credentials(args: argparse.Namespace) -> tuple[tuple[str, str] | None, str | None]:
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            raise UserError("--auth wants USER:PASS with both parts non-empty")
        return (user, password), None
    if args.token_file is not None:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as err:
            raise UserError(f"cannot read --token-file {args.token_file!r}: {err.strerror or err}") from None
        if not token or any(c.isspace() for c in token):
            raise UserError(f"--token-file {args.token_file!r} must hold one token without spaces")
        return None, token
    return None, None


def _limits(args: argparse.Namespace):
    from sdlab.server.config import Limits

    for flag, value in (("--max-queue", args.max_queue), ("--max-pixels", args.max_pixels),
                        ("--max-steps", args.max_steps), ("--max-batch", args.max_batch),
                        ("--max-images", args.max_images)):
        if value < (0 if flag == "--max-queue" else 1):
            raise UserError(f"{flag} must be positive, got {value}")
    if not args.max_body_mb > 0:
        raise UserError(f"--max-body-mb must be positive, got {args.max_body_mb}")
    return Limits(max_body_bytes=int(args.max_body_mb * (1 << 20)), max_pixels=args.max_pixels,
                  max_steps=args.max_steps, max_batch=args.max_batch, max_images=args.max_images)


def _allowed_hosts(given: str) -> tuple[str, ...]:
    """The names of --allowed-hosts (commas between them); a name with a space or a port is an error."""
    names = tuple(name.strip() for name in given.split(",") if name.strip())
    for name in names:
        if any(c.isspace() or c in ":/[]" for c in name):
            raise UserError(f"--allowed-hosts takes host names without ports, commas between them; got {name!r}")
    return names


def _listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket (so a taken port is a clear error, and --port 0 works)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise UserError(f"cannot listen on {host!r}: {err.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)        # proto TCP: asyncio then turns Nagle off per connection
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _model_folder(given: str | None, option: str, models_dir: str | None, default: str) -> Path | None:
    """The folder `option` names (it must be one), else `<models-dir>/<default>` when that exists, else None."""
    if given is not None:
        if not Path(given).is_dir():
            raise UserError(f"the {option} {given!r} is not a folder")
        return Path(given)
    fallback = Path(models_dir) / default if models_dir is not None else None
    return fallback if fallback is not None and fallback.is_dir() else None


def _styles_files(given: list[str], models_dir: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The --styles-file files and patterns, else the styles.csv in --models-dir or, when that is A1111's `models`
    folder (it has `Stable-diffusion/`), the one of the webui folder above it (A1111's own), if there is one; each
    file read now, so that a missing or malformed one is an error before the server starts. With neither, the
    paths of those styles.csv files, which the server watches (one made later is read then)."""
    from sdlab.pipeline.styles import STYLES_FILE, StyleDatabase, StylesError

    near: list[Path] = []
    if not given and models_dir is not None:
        folder = Path(models_dir)
        near = [folder / STYLES_FILE] + ([folder.parent / STYLES_FILE] if (folder / "Stable-diffusion").is_dir() else [])
        given = [str(path) for path in near if path.is_file()][:1]
    try:
        StyleDatabase.load(given)
    except StylesError as err:
        raise UserError(f"--styles-file: {err}") from None
    return tuple(given), () if given else tuple(map(str, near))


def run_serve(args: argparse.Namespace) -> int:
    from sdlab.api import resolve_device
    from sdlab.pipeline.request import RequestError
    from sdlab.server.config import is_loopback

    basic, token = _credentials(args)
    allowed_hosts = _allowed_hosts(args.allowed_hosts)
    if not is_loopback(args.host) and basic is None and token is None:
        raise UserError(f"refusing to listen on {args.host} without authentication: anyone who can reach this "
                        "machine could use it; add --auth USER:PASS or --token-file FILE (or keep --host 127.0.0.1)")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    if args.model is not None and not Path(args.model).exists():
        raise UserError(f"the --model {args.model!r} does not exist")
    if args.models_dir is not None and not Path(args.models_dir).is_dir():
        raise UserError(f"the --models-dir {args.models_dir!r} is not a folder")
    controlnet_dir = _model_folder(args.controlnet_dir, "--controlnet-dir", args.models_dir, "ControlNet")
    upscalers_dir = _model_folder(args.upscalers_dir, "--upscalers-dir", args.models_dir, "ESRGAN")
    realesrgan_dir = _model_folder(None, "", args.models_dir, "RealESRGAN")     # A1111's, beside --upscalers-dir
    vae_dir = _model_folder(args.vae_dir, "--vae-dir", args.models_dir, "VAE")
    styles_files, styles_candidates = _styles_files(args.styles_file, args.models_dir)
    try:
        resolve_device(args.device)
    except RequestError as err:
        raise UserError(str(err)) from None
    limits = _limits(args)
    make_output_folder(args.output_dir, "--output-dir")

    import uvicorn

    from sdlab.server.app import Server, create_app
    from sdlab.server.config import ServerConfig
    from sdlab.server.store import StoreError

    config = ServerConfig(output_dir=Path(args.output_dir), model=Path(args.model) if args.model else None,
                          models_dir=Path(args.models_dir) if args.models_dir else None, device=args.device,
                          embeddings_dir=Path(args.embeddings_dir) if args.embeddings_dir else None,
                          controlnet_dir=controlnet_dir, upscalers_dir=upscalers_dir,
                          realesrgan_dir=realesrgan_dir, vae_dir=vae_dir, styles_files=styles_files,
                          styles_candidates=styles_candidates,
                          max_queue=args.max_queue, basic_auth=basic, token=token, limits=limits,
                          host=args.host, allowed_hosts=allowed_hosts)
    sock = _listen(args.host, args.port)
    try:
        app = create_app(config, preload=True)
    except StoreError as err:
        sock.close()
        raise UserError(str(err)) from None
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"sdlab serve: http://{shown}:{port}/ (API: /sdapi/v1, /api/jobs; Ctrl+C stops)", file=sys.stderr, flush=True)
    server = Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                   timeout_graceful_shutdown=5), app.state.service)
    logging.getLogger("sdlab.server").setLevel(logging.INFO)
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, Terminated) as stop:   # uvicorn shut down gracefully, then passed the signal on
        print("sdlab serve: stopped", file=sys.stderr)
        return 128 + (signal.SIGINT if isinstance(stop, KeyboardInterrupt) else signal.SIGTERM)
    return 0
