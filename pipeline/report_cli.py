"""``optipipe report``: the sweep summary (table, CSV, plots, best configuration) of any past sweep."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import report, stale_runs
from pipeline.config import TrackerSettings
from pipeline.tracking import _client, tracking_uri


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="optipipe report", description=__doc__)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--experiment", default="optipipe", help="latest sweep of this experiment")
    which.add_argument("--parent", help="the sweep's parent run id")
    p.add_argument("--uri", help="tracking store (default: MLFLOW_TRACKING_URI or ./outputs/mlflow.db)")
    p.add_argument("--out", type=Path, help="folder for summary.md/.csv and plots")
    p.add_argument("--into", type=Path, help="also put the table, headed by command, cards, date and versions, "
                                              "into this Markdown file between the --section markers")
    p.add_argument("--section", default="sweep_report",
                   help="NAME in the markers <!-- NAME:begin --> … <!-- NAME:end --> of --into (default sweep_report)")
    p.add_argument("--repair", action="store_true",
                   help="only mark this host's runs left RUNNING by a killed process as KILLED (every experiment)")
    args = p.parse_args(argv)
    client = _client(tracking_uri(TrackerSettings(uri=args.uri)))
    if args.repair:
        fixed = stale_runs.repair(client, found_by="optipipe report --repair")
        print(f"optipipe report: {len(fixed)} run(s) left RUNNING by a killed process marked KILLED"
              + "".join(f"\n  {run_id}" for run_id in fixed))
        return 0
    try:
        parent = args.parent or report.latest_sweep(client, args.experiment)
        rows = report.sweep_rows(client, parent)
    except Exception as e:  # unknown experiment / run id: the user's to fix
        print(f"optipipe report: {e}")
        return 2
    if not rows:
        print(f"optipipe report: sweep {parent} has no jobs")
        return 2
    table = f"{report.markdown(rows)}\n\n{report.best_line(rows)}"
    if args.into is not None:  # checked before anything is written: a wrong file or section writes nothing
        try:
            report.write_section(args.into, f"{report.heading(client, parent)}\n\n{table}", args.section)
        except (OSError, LookupError) as e:
            print(f"optipipe report: {e}")
            return 2
    out = args.out or Path("outputs") / "reports" / parent
    files = report.write(rows, out)
    print(f"sweep {parent}\n\n{table}\n")
    print("written: " + ", ".join(str(f) for f in [*files, *([args.into] if args.into else [])]))
    return 0
