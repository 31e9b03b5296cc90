"""`sdlab inspect [PATH]`: what sdlab sees in a checkpoint, read from names, shapes and metadata only.

Without a path it describes the model that ships inside the package (the one `sdlab txt2img` draws with).
A file that is not a whole model (a LoRA, a ControlNet, a VAE, an upscaler, an embedding, one component
folder of a diffusers pipeline) is described as that kind, with the option that takes it
(`sdlab.checkpoints.other_kinds`). A model without a VAE is described with what it has, the VAE named missing
(drawing with it needs `--vae`).
"""

from __future__ import annotations

import argparse
import json

from sdlab.families import family_names


def add_inspect(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="describe a checkpoint: family, prediction type, configs, parameter counts, dtypes, keys (or what a "
        "LoRA, ControlNet, VAE, upscaler, embedding file or sdlab train run checkpoint is)",
        description="Read a checkpoint's names, shapes and metadata (no weights: a LoRA's alphas and an embedding's "
        "vectors are the only values read) and describe what sdlab sees.",
    )
    p.add_argument("path", nargs="?", help="a .safetensors / .ckpt / .pt / .pth / .bin file or a diffusers folder "
                   "(default: the model shipped with sdlab)")
    p.add_argument("--family", choices=family_names(), help="skip detection and treat the file as this family")
    p.add_argument("--prediction", choices=("eps", "v", "x0"), help="override the prediction type")
    p.add_argument("--vae", help="a standalone VAE file or diffusers VAE folder to use instead of the file's own")
    p.add_argument("--no-sidecar-vae", dest="sidecar_vae", action="store_false",
                   help="keep the file's own VAE where an A1111 sidecar <name>.vae.* lies beside it")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    p.set_defaults(run=run_inspect)


def _format_inspect(report: dict) -> str:
    lines = [
        f"file            {report['source']}",
        f"family          {report['family']} ({report['family_source']}): {report['description']}",
        f"prediction      {report['prediction']} ({report['prediction_source']})",
        f"latent scaling  {report['scaling_factor']}",
        *([f"latent stats    mean {report['latent_stats']['mean']}, std {report['latent_stats']['std']}"]
          if "latent_stats" in report else []),
        *([f"noise model     {report['noise_model']} ({report['noise_model_source']})"] if "noise_model" in report else []),
        *([f"steps offset    {report['steps_offset']} (diffusers-spaced schedules count from it)"]
          if report["steps_offset"] != 1 else []),
        f"default size    {report['default_size']} px",
        f"keys            {report['total_keys']} in the file; {report['total_parameters']:,} parameters in all",
        "components:",
    ]
    for c in report["components"]:
        lines.append(
            f"  {c['name']:<14} {c['parameters']:>14,} parameters  {c['keys']:>5} tensors  {'/'.join(c['dtypes'])}"
        )
        if c["origin"] != report["source"]:                  # a folder's component, an override
            lines.append(f"  {'':<14} from {c['origin']}")
        config = ", ".join(f"{k}={v}" for k, v in c["config"].items())
        lines.append(f"  {'':<14} {config}")
        if c["ignored_keys"]:
            lines.append(f"  {'':<14} ignored: {', '.join(c['ignored_keys'])}")
    ignored = report["ignored_keys"]
    if ignored:
        ema = [k for k in ignored if k.startswith("model_ema.")]
        others = [k for k in ignored if not k.startswith("model_ema.")]
        shown = others + ([f"model_ema.* ({len(ema)} keys)"] if ema else [])
        lines.append(f"ignored keys    {len(ignored)}: {', '.join(shown)}")
    else:
        lines.append("ignored keys    none")
    if "missing_vae" in report:
        lines.append(f"missing keys    the VAE's ({report['missing_vae']}): to draw, pass --vae FILE; the other "
                     "networks' keys and shapes match")
    else:
        lines.append("missing keys    none (every network's keys and shapes match)")
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    from sdlab.api import shipped_model_path
    from sdlab.checkpoints.errors import CheckpointError
    from sdlab.checkpoints.load import plan_checkpoint
    from sdlab.checkpoints.other_kinds import describe_other_kind, format_description
    from sdlab.cli.errors import UserError

    path = args.path or shipped_model_path()
    if path is None:
        raise UserError("no path given and this sdlab install has no built-in model; pass a checkpoint PATH")
    try:
        plan = plan_checkpoint(path, family=args.family, prediction=args.prediction, vae=args.vae,
                               sidecar_vae=args.sidecar_vae, need_vae=False)
    except CheckpointError:
        described = describe_other_kind(path)               # a LoRA, a VAE, ...: what it is, not what it lacks
        if described is None:
            raise
        print(json.dumps(described, indent=2) if args.json else format_description(described))
        return 0
    report = plan.report.to_json()
    report["total_parameters"] = sum(c["parameters"] for c in report["components"])
    print(json.dumps(report, indent=2) if args.json else _format_inspect(report))
    return 0


