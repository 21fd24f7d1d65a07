"""Final metrics of a sweep as a table: one row per configuration, mean ± std over its seeds.

    python -m ddpm.results runs/quickstart/multirun_2026-11-23_10-00-00
    python -m ddpm.results runs/.../multirun_... --metrics val/loss val/fid10k_train_ddim50
    python -m ddpm.results --wandb-group ENTITY/PROJECT/GROUP      # the same from W&B (online)

Each run of a multirun leaves run.json (its overrides) and metrics.json (its final metrics);
runs that differ only in `seed=` form one configuration. Writes results.md and results.csv
into the sweep directory (or --out) and prints the Markdown. A run with run.json but no
metrics.json did not finish (crashed, killed or still running): it is named in a warning and
in the table's footnote, never silently left out.

By default the table shows what compares across schedules and objectives: the NLL bound
val/bpd, FID/KID when measured, then val/loss and the epoch-mean training loss (both depend on
the schedule and the objective's weighting: rank a schedule sweep on bpd or FID, not on them).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from ddpm.files import read_json

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


def unfinished_runs(sweep_dir: str | Path) -> list[Path]:
    """Run directories with run.json but no metrics.json: jobs that did not finish."""
    return sorted(
        info.parent
        for info in Path(sweep_dir).rglob("run.json")
        if not (info.parent / "metrics.json").is_file()
    )


def emptied_runs(sweep_dir: str | Path) -> list[Path]:
    """Run directories whose metrics.json holds only the step: a rerun of the finished run by
    a version of train.py from before finished runs kept their results rewrote it so."""
    emptied = []
    for path in sorted(Path(sweep_dir).rglob("metrics.json")):
        try:
            if (path.parent / "run.json").is_file() and set(read_json(path)) <= {"step"}:
                emptied.append(path.parent)
        except ValueError:  # unreadable: read_sweep names it
            continue
    return emptied


def read_sweep(sweep_dir: str | Path) -> list[tuple[str, str, dict[str, float]]]:
    """(configuration, seed, metrics) for every finished run under `sweep_dir`."""
    runs = []
    for metrics_file in sorted(Path(sweep_dir).rglob("metrics.json")):
        info_file = metrics_file.with_name("run.json")
        if not info_file.is_file():
            continue
        info = read_json(info_file)
        metrics = read_json(metrics_file)
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
    found = {k for _, _, m in runs for k in m}
    if not metrics:  # the comparable ones first, then the losses
        fair = ["val/bpd"] + sorted(k for k in found if k.startswith(("val/fid", "val/kid")))
        rest = sorted(k for k in found if k.startswith("val/") and k not in fair)
        metrics = [k for k in fair if k in found] + rest
        # the epoch-mean training loss; runs from before it existed have one batch's loss
        metrics += [k for k in ("train/loss_mean", "train/loss") if k in found][:1]
    missing = [k for k in metrics if k not in found]
    if missing:
        raise ValueError(
            f"no run logged {missing[0]!r}; the runs logged: {', '.join(sorted(found))}"
        )
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


def write_tables(
    names: list[str], rows: list[dict], out_dir: Path, unfinished: list[Path] | None = None
) -> str:
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
    if unfinished:
        lines.append("")
        lines.append(
            f"{len(unfinished)} run(s) did not finish and are not in the table: "
            + ", ".join(str(p) for p in unfinished)
        )
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
    for run in emptied_runs(args.sweep_dir) if args.sweep_dir else []:  # before any error
        print(
            f"WARNING: {run}/metrics.json holds no metrics (an older train.py rerun of the "
            "finished run emptied it); its logged values are in its logs/metrics.csv",
            file=sys.stderr,
        )
    try:
        if args.wandb_group:
            runs = read_wandb_group(args.wandb_group)
        else:
            runs = read_sweep(args.sweep_dir)
        names, rows = summarize(runs, args.metrics)
    except (ValueError, FileNotFoundError) as e:  # the data, not the usage: no usage line
        print(f"Error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    unfinished = unfinished_runs(args.sweep_dir) if args.sweep_dir else []
    for run in unfinished:
        print(f"WARNING: {run} has no metrics.json: the job did not finish", file=sys.stderr)
    out = Path(args.out or args.sweep_dir or ".")
    markdown = write_tables(names, rows, out, unfinished)
    print(markdown)
    return markdown


if __name__ == "__main__":
    main(sys.argv[1:])
