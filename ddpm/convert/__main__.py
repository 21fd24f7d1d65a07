"""python -m ddpm.convert import SRC OUT.ckpt [--schedule ...] | export CKPT OUT_DIR [--overwrite]
python -m ddpm.convert import MODEL.pt OUT.ckpt --flags "MODEL_FLAGS DIFFUSION_FLAGS" [--codebase]

A bad input (a folder without a UNet, a setting that does not map exactly, an existing output)
is one line naming the file, key and value and the fix, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ddpm.checkpoint import CheckpointError
from ddpm.convert.openai import import_openai
from ddpm.convert.pipeline import export_pipeline, import_pipeline, scheduler_options
from ddpm.convert.unet2d import ConversionError
from ddpm.trusted import UntrustedFile


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ddpm.convert",
        description="diffusers pipelines in (import) and out (export); docs/published_models.md",
    )
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser(
        "import", help="a diffusers folder or an OpenAI .pt -> a checkpoint of this project"
    )
    i.add_argument(
        "src",
        help="pipeline folder (model_index.json), unet/ + scheduler/, or a UNet; or an "
        "improved-diffusion / guided-diffusion .pt (with --flags)",
    )
    i.add_argument("out", help="the checkpoint to write (must not exist)")
    i.add_argument(
        "--schedule",
        help="a UNet folder without a scheduler: its training betas, linear | cosine "
        "(squaredcos_cap_v2) | scaled_linear | sigmoid (diffusers' beta_schedule names)",
    )
    i.add_argument("--timesteps", type=int, default=1000, help="with --schedule: T")
    i.add_argument("--beta-start", type=float, default=1e-4, help="with --schedule")
    i.add_argument("--beta-end", type=float, default=0.02, help="with --schedule")
    i.add_argument(
        "--prediction-type",
        default="epsilon",
        help="with --schedule: epsilon | sample | v_prediction",
    )
    i.add_argument(
        "--variance-type",
        default="fixed_large",
        help="with --schedule: fixed_large (Ho et al.'s CIFAR-10) | fixed_small | learned_range",
    )
    i.add_argument("--no-clip-sample", action="store_true", help="with --schedule")
    i.add_argument(
        "--null-label",
        default="auto",
        help="num_class_embeds models: last (the last row is the null label of guidance) | none "
        "| auto (an exported folder's ddpm.json says, else none)",
    )
    i.add_argument(
        "--dropout",
        type=float,
        help="the network's dropout for fine-tuning (default: the config's)",
    )
    i.add_argument(
        "--flags",
        help="an OpenAI .pt: the MODEL_FLAGS and DIFFUSION_FLAGS of its README, e.g. "
        "'--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout "
        "0.3 --diffusion_steps 4000 --noise_schedule cosine'",
    )
    i.add_argument(
        "--codebase",
        default="auto",
        help="with --flags: whose defaults complete them, improved | guided (-diffusion) | auto "
        "(the one that reads them; refused where both do and differ)",
    )
    e = sub.add_parser("export", help="a checkpoint -> a folder DDPMPipeline.from_pretrained loads")
    e.add_argument("ckpt")
    e.add_argument("out_dir")
    e.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    return p


def run(args: argparse.Namespace) -> dict:
    if args.command == "export":
        return export_pipeline(args.ckpt, args.out_dir, overwrite=args.overwrite)
    if _openai(args):
        return import_openai(args.src, args.out, args.flags, args.codebase)
    schedule = None
    if args.schedule is not None:
        schedule = scheduler_options(
            args.schedule,
            args.timesteps,
            args.beta_start,
            args.beta_end,
            args.prediction_type,
            args.variance_type,
            not args.no_clip_sample,
        )
    return import_pipeline(
        args.src, args.out, schedule=schedule, null_label=args.null_label, dropout=args.dropout
    )


def _openai(args: argparse.Namespace) -> bool:
    """An OpenAI state dict (a .pt / .pth file with --flags) rather than a diffusers folder;
    the options of the other kind refused by name."""
    openai = args.flags is not None or Path(args.src).suffix in (".pt", ".pth")
    if not openai:
        if args.codebase != "auto":
            raise ConversionError("--codebase is for an OpenAI .pt with --flags: drop it")
        return False
    if args.flags is None:
        raise ConversionError(
            f"SRC={args.src}: an OpenAI .pt needs the flags of its README: --flags "
            '"$MODEL_FLAGS $DIFFUSION_FLAGS" (docs/published_models.md lists them)'
        )
    if Path(args.src).is_dir():
        raise ConversionError(
            f"SRC={args.src} is a folder: --flags is for an OpenAI .pt state dict; drop it"
        )
    given = [
        flag
        for flag, value, default in (
            ("--schedule", args.schedule, None),
            ("--null-label", args.null_label, "auto"),
            ("--dropout", args.dropout, None),
        )
        if value != default
    ]
    if given:
        raise ConversionError(
            f"{given[0]} is for a diffusers folder: an OpenAI .pt takes its settings from "
            "--flags (e.g. --dropout inside them)"
        )
    return True


def fine_tune_overrides(net: dict) -> str:
    """train.py overrides that rebuild the imported network (resume= compares it)."""
    keys = [k for k in net if k not in ("_target_", "image_size", "in_channels")]
    return " ".join(f"++model.{k}={json.dumps(net[k]).replace(' ', '')}" for k in keys)


def openai_report(summary: dict) -> str:
    """What an OpenAI import prints: what it was read as, and the commands that use it."""
    net, hp, schedule = summary["net"], summary["hparams"], summary["schedule"]
    codebase = {"either": "improved- or guided-diffusion's (they read these flags alike)"}
    name = codebase.get(summary["codebase"], f"{summary['codebase']}-diffusion's")
    process = f"schedule={schedule['_target_'].rsplit('.', 1)[-1]}" + "".join(
        f" schedule.{k}={v}" for k, v in schedule.items() if k != "_target_"
    )
    process += f" module.objective={hp['objective']}"
    process += f" module.learn_sigma={json.dumps(hp['learn_sigma'])}"
    process += f" module.vlb_weight={hp['vlb_weight']:g}"
    process += f" module.loss={hp['loss']}" if hp.get("loss") else ""
    process += " module.cond_drop_prob=0" if not hp["cond_drop_prob"] else ""
    return (
        f"wrote {summary['out']}: {summary['parameters'] / 1e6:.2f}M parameters, the flags read "
        f"with {name} defaults, every tensor of the file in place (strict load); read back, "
        "it draws what the loaded network draws\n"
        f"  sample:    python sample.py ckpt={summary['out']}\n"
        f"  bits/dim:  python eval.py source={summary['out']} nll=true fid=false dataset=...\n"
        f"  fine-tune: python train.py resume={summary['out']} hydra.run.dir=NEW_DIR "
        f"dataset=... model=adm {fine_tune_overrides(net)} {process}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        summary = run(args)
    except (ConversionError, CheckpointError, UntrustedFile, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.command == "import" and "codebase" in summary:
        print(openai_report(summary))
    elif args.command == "import":
        print(
            f"wrote {summary['out']}: {summary['parameters'] / 1e6:.2f}M parameters, the same "
            f"function as the source (max relative difference {summary['max_difference']:.1e})\n"
            f"  sample:    python sample.py ckpt={summary['out']}\n"
            f"  fine-tune: python train.py resume={summary['out']} hydra.run.dir=NEW_DIR "
            f"dataset=... {fine_tune_overrides(summary['net'])}"
        )
    else:
        print(
            f"wrote {summary['out']}: DDPMPipeline.from_pretrained({summary['out']!r}) loads it "
            f"(max relative difference {summary['max_difference']:.1e})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
