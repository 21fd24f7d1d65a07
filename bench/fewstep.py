"""Few-step sampling side by side: a teacher, its progressively distilled students, and the
teacher's own samplers at the students' network calls per image (issue 27, part 4).

    python -m bench.fewstep --run runs/distill_quickstart/<date>
    python -m bench.fewstep --run RUN --teacher CKPT --fid-n 1000 --read-n 64 \
        --out bench/results/fewstep

One process, the same seed and labels (digit k mod 10 for image k) for every row:
- readability as asked (bench.readability: a real-MNIST classifier reads p > 0.9 as the digit the
  image was drawn for; the weakest digit) of `--read-n` images;
- FID of `--fid-n` images against the 5,000 digits (the 2048-d pool3 features of the TF-Inception
  that eval.py uses, fid-helper's offline file; statistics cached as eval.py's);
- NFE per image (network evaluations: steps, twice each with classifier-free guidance; one per
  step for a student, whose guidance is in its weights);
- img/s of drawing the FID images (bf16 autocast where the CPU has it, as sample.py; eager, or
  `--compile auto|true` as sample.py's compile=, compile time included);
- the distillation's wall time per stage (RUN/distill.json).
Rows: the teacher at its own sampler and at the guided DDIM grid the first student learned from;
each student (DDIM, trailing grid, its steps); and at each student's NFE the teacher with DDIM
(trailing grid) and DPM-Solver++(2M) (logsnr grid), guided at NFE/2 steps and unguided at NFE
steps. Writes OUT.md (a markdown table) and OUT.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.readability import centre_28, readability
from ddpm.data.loaders import load_mnist5k
from ddpm.device import autocast
from ddpm.generate import Evaluations, generate
from ddpm.metrics.fid import InceptionMetrics
from ddpm.metrics.inception import fid_helper_file, inception_weights
from ddpm.metrics.reference import cached_reference, stats_key
from ddpm.module import load_module


def draw(module, n: int, sampler: dict, guidance: float, batch: int = 250, compile="false"):
    """n images (n, C, H, W) in [-1, 1] of seed 0, image k drawn for digit k mod 10, the
    seconds they took (compiling included) and the network calls per image, counted."""
    tally = Evaluations()
    start = time.perf_counter()
    images = [
        x.cpu()
        for _, x in generate(
            module,
            n,
            sampler=sampler,
            labels="cycle",
            guidance=guidance,
            batch_size=batch,
            context=lambda: autocast("auto", module.device),
            progress=False,
            compile=compile,
            evaluations=tally,
        )
    ]
    return torch.cat(images), time.perf_counter() - start, tally.per_image


def measure_row(module, sampler: dict, guidance: float, args, metrics) -> dict:
    """Readability of the first read_n images, FID of fid_n, NFE per image and img/s."""
    n = max(args.fid_n, args.read_n)
    images, seconds, nfe = draw(module, n, sampler, guidance, compile=args.compile)
    read = images[: args.read_n]
    labels = torch.arange(len(read)) % 10
    report = readability(centre_28((read + 1) / 2), labels=labels)
    per = report["per_digit_as_label"]
    row = {
        "sampler": sampler["sampler"],
        "steps": sampler["steps"],
        "guidance": guidance,
        "nfe_per_image": nfe,  # counted: steps, x2 with guidance (one doubled batch)
        "readable_as_asked": report["fraction_as_label"],
        "weakest_digit": min(v for v in per if v is not None),
        "img_per_s": round(len(images) / seconds, 1),
    }
    if metrics is not None:
        for batch in images[: args.fid_n].split(250):
            metrics.update(batch, real=False)
        row["fid"] = round(float(metrics.fid.compute()), 2)
        metrics.reset()
    return row


def inception(args) -> InceptionMetrics | None:
    """The FID network with the 5,000 digits' statistics (cached as eval.py caches them)."""
    if not args.fid_n:
        return None
    weights = inception_weights(args.weights or fid_helper_file())
    metrics = InceptionMetrics(weights, "cpu", 2048)
    reference = load_mnist5k().images
    key = stats_key("mnist5k", "train", reference, weights, 2048, None)
    cached_reference(metrics, key, lambda: reference.split(250))
    return metrics


def rows(args) -> tuple[list[dict], dict]:
    run = Path(args.run)
    record = json.loads((run / "distill.json").read_text())
    teacher = load_module(args.teacher or record["teacher"])
    w = float(record["guidance"])
    metrics = inception(args)
    out = []
    own = dict(teacher.sampling) or {"sampler": "ddpm", "steps": None}
    own_w = float(own.pop("guidance", w) or 0.0)
    # its own sampler, and the guided DDIM the first student learned from
    grid = {"sampler": "ddim", "steps": record["teacher_steps"], "spacing": "trailing"}
    for sampler, guidance in ((own, own_w), (grid, w)):
        out.append({"model": "teacher", **measure_row(teacher, sampler, guidance, args, metrics)})
        print(out[-1], flush=True)
    for k, stage in sorted(record["stages"].items(), key=lambda kv: int(kv[0])):
        student = load_module(stage["checkpoint"])
        sampler = {key: v for key, v in student.sampling.items() if key != "guidance"}
        row = measure_row(student, sampler, 0.0, args, metrics)
        out.append({"model": f"student {k}", **row, "distill_s": stage["seconds"]})
        print(out[-1], flush=True)
        nfe = round(row["nfe_per_image"])
        if nfe not in args.compare:
            continue
        for name, options in (("ddim", {"spacing": "trailing"}), ("dpmpp_2m", {})):
            settings = [(nfe // 2, w)] if nfe >= 2 and w else []
            for steps, guidance in [*settings, (nfe, 0.0)]:
                sampler = {"sampler": name, "steps": steps, **options}
                out.append(
                    {"model": "teacher", **measure_row(teacher, sampler, guidance, args, metrics)}
                )
                print(out[-1], flush=True)
    return out, record


def table(found: list[dict]) -> str:
    head = (
        "| model | sampler | steps | w | NFE/image | readable as asked | weakest digit | FID "
        "| img/s | distillation s |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in found:
        lines.append(
            f"| {r['model']} | {r['sampler']} | {r['steps'] or 'T'} | {r['guidance']:g} | "
            f"{r['nfe_per_image']} | {100 * r['readable_as_asked']:.0f} % | "
            f"{100 * r['weakest_digit']:.0f} % | {r.get('fid', '-')} | {r['img_per_s']} | "
            f"{r.get('distill_s', '')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the distillation's run directory")
    parser.add_argument("--teacher", default=None, help="default: distill.json's")
    parser.add_argument("--read-n", type=int, default=64)
    parser.add_argument("--fid-n", type=int, default=1000, help="0: no FID")
    parser.add_argument("--weights", default=None, help="Inception weights (fid-helper's)")
    parser.add_argument("--compare", type=int, nargs="*", default=[8, 4, 2, 1])
    parser.add_argument("--out", default="bench/results/fewstep")
    parser.add_argument("--compile", default="false", choices=["auto", "true", "false"])
    args = parser.parse_args()
    torch.manual_seed(0)
    found, record = rows(args)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = {
        "date": when,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "teacher": record["teacher"],
        "distillation_s": record.get("seconds"),
        "rows": found,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(body, indent=1) + "\n")
    text = f"{when}; distillation {record.get('seconds')} s in all\n\n{table(found)}\n"
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
