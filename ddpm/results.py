"""Final metrics of a sweep as a table: one row per configuration, mean ± std over its seeds.

    python -m ddpm.results runs/quickstart/multirun_2026-11-23_10-00-00
    python -m ddpm.results runs/.../multirun_... --metrics val/loss val/fid10k_train_ddim50
    python -m ddpm.results --wandb-group ENTITY/PROJECT/GROUP      # the same from W&B (online)

Each run of a multirun leaves run.json (its overrides) and metrics.json (its final metrics);
runs that differ only in `seed=` form one configuration. Writes results.md and results.csv
into the sweep directory (or --out) and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

IGNORED = ("seed", "resume", "trainer.enable_progress_bar")


def configuration(overrides: list[str], ignore: tuple[str, ...] = IGNORED) -> str:
    """The overrides that define a configuration: all but the seed and what changes no result
    (progress bars, resuming, where files go)."""
    keep = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in ignore or key.startswith(("hydra.", "paths.")):
            continue
        keep.append(item)
    return " ".join(sorted(keep)) or "(defaults)"


def read_sweep(sweep_dir: str | Path) -> list[tuple[str, str, dict[str, float]]]:
    """(configuration, seed, metrics) for every finished run under `sweep_dir`."""
    runs = []
    for metrics_file in sorted(Path(sweep_dir).rglob("metrics.json")):
        info_file = metrics_file.with_name("run.json")
        if not info_file.is_file():
            continue
        info = json.loads(info_file.read_text())
        metrics = json.loads(metrics_file.read_text())
        runs.append((configuration(info["overrides"]), str(info.get("seed")), metrics))
    if not runs:
        raise FileNotFoundError(
            f"no finished runs (run.json + metrics.json) under {sweep_dir}; give the directory "
            "of a multirun (runs/<name>/multirun_<date>)"
        )
    return runs


def read_wandb_group(path: str) -> list[tuple[str, str, dict[str, float]]]:
    """The same from a W&B group ENTITY/PROJECT/GROUP (needs a login and a network)."""
    import wandb

    entity, project, group = path.split("/")
    runs = []
    for run in wandb.Api().runs(f"{entity}/{project}", filters={"group": group}):
        info = run.config.get("run", {})
        metrics = {k: v for k, v in run.summary.items() if isinstance(v, (int, float))}
        runs.append((configuration(info.get("overrides", [])), str(info.get("seed")), metrics))
    return runs


def summarize(
    runs: list[tuple[str, str, dict[str, float]]], metrics: list[str] | None = None
) -> tuple[list[str], list[dict]]:
    """Rows of {configuration, seeds, <metric>: (mean, std)}; std is over seeds (n - 1)."""
    if not metrics:  # the validation metrics and the final training loss
        found = {k for _, _, m in runs for k in m}
        metrics = sorted(k for k in found if k.startswith("val/"))
        metrics += ["train/loss"] if "train/loss" in found else []
    names = metrics
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    for config, _seed, values in runs:
        groups[config].append(values)
    rows = []
    for config, members in sorted(groups.items()):
        row: dict = {"configuration": config, "seeds": len(members)}
        for name in names:
            values = [m[name] for m in members if _finite(m.get(name))]
            mean = statistics.fmean(values) if values else math.nan
            std = statistics.stdev(values) if len(values) > 1 else math.nan
            row[name] = (mean, std)
        rows.append(row)
    return names, rows


def _finite(value: object) -> bool:
    """A number to average: metrics.json holds null for a metric that was not finite."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def write_tables(names: list[str], rows: list[dict], out_dir: Path) -> str:
    header = "| configuration | seeds | " + " | ".join(names) + " |"
    lines = [header, "|---|---|" + "---|" * len(names)]
    csv = ["configuration,seeds," + ",".join(f"{n},{n}_std" for n in names)]
    for row in rows:
        cells = []
        for name in names:
            mean, std = row[name]
            cells.append(f"{mean:.4g}" + ("" if math.isnan(std) else f" ± {std:.2g}"))
        lines.append(f"| {row['configuration']} | {row['seeds']} | " + " | ".join(cells) + " |")
        numbers = ",".join(f"{row[n][0]:.6g},{row[n][1]:.6g}" for n in names)
        csv.append(f'"{row["configuration"]}",{row["seeds"]},{numbers}')
    markdown = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(markdown)
    (out_dir / "results.csv").write_text("\n".join(csv) + "\n")
    return markdown


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", nargs="?", help="a multirun directory")
    parser.add_argument("--wandb-group", help="ENTITY/PROJECT/GROUP instead of a directory")
    parser.add_argument("--metrics", nargs="*", help="which final metrics (default: val/*)")
    parser.add_argument("--out", help="where to write results.md / .csv (default: sweep_dir)")
    args = parser.parse_args(argv)
    if bool(args.sweep_dir) == bool(args.wandb_group):
        parser.error("give a sweep directory or --wandb-group, not both")
    runs = read_wandb_group(args.wandb_group) if args.wandb_group else read_sweep(args.sweep_dir)
    names, rows = summarize(runs, args.metrics)
    out = Path(args.out or args.sweep_dir or ".")
    markdown = write_tables(names, rows, out)
    print(markdown)
    return markdown


if __name__ == "__main__":
    main(sys.argv[1:])
