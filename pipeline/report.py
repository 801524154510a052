"""Sweep reports: one comparison table (Markdown, CSV), plots and the best configuration.

Built from what the MLflow store holds, so the end-of-sweep summary and ``optipipe report`` for
any past sweep are the same function on the same data.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# (column, metric names tried in order): decoders and encoders report different throughputs
# Each column under its own workload's name: a decoder's TTFT is not an encoder's batch latency.
# A table shows only the columns some row has, so an encoder sweep gets encoder columns.
COLUMNS: list[tuple[str, tuple[str, ...]]] = [
    ("tokens_per_s", ("generate/decode_tokens_per_s", "generate/tokens_per_s")),
    ("x_one_process", ()),  # derived in a sweep over processes: see with_scaling
    ("e2e_tokens_per_s", ("generate/e2e_tokens_per_s",)),
    ("ttft_ms_p50", ("generate/ttft_ms_p50",)),
    ("itl_ms_p50", ("generate/itl_ms_p50",)),
    ("itl_ms_p90", ("generate/itl_ms_p90",)),
    ("sequences_per_s", ("generate/sequences_per_s",)),
    ("batch_latency_ms_p50", ("generate/batch_latency_ms_p50",)),
    ("batch_latency_ms_p90", ("generate/batch_latency_ms_p90",)),
    ("peak_memory_gib", ("generate/memory_peak_allocated_gib", "generate/memory_peak_rss_gib")),
    ("mbu", ("generate/mbu",)),
    ("perplexity", ("evaluate/perplexity",)),
    ("top1_agreement", ("evaluate/top1_agreement",)),
]


@dataclass
class Row:
    run_id: str
    overrides: str
    status: str
    gate: str
    values: dict[str, float] = field(default_factory=dict)
    reused: bool = False  # a resumed sweep's stand-in: measured by an earlier run (run_id), not this sweep

    def value(self, column: str) -> float:
        return self.values.get(column, math.nan)

    @property
    def status_text(self) -> str:
        return f"{self.status} (reused from {self.run_id})" if self.reused else self.status


def row_of(run: Any, reused: bool = False) -> Row:
    m, tags = run.data.metrics, run.data.tags
    values = {}
    for column, names in COLUMNS:
        found = next((m[n] for n in names if n in m), None)
        if found is not None:
            values[column] = found
    return Row(run.info.run_id, tags.get("optipipe.overrides", run.info.run_name or ""),
               run.info.status, tags.get("evaluate.gate", "not set"), values, reused)


def jobs_of(client: Any, parent: Any, **kwargs: Any) -> list[Any]:
    """The runs a sweep ran, oldest first."""
    return client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = "
                              f"'{parent.info.run_id}'", order_by=["attributes.start_time ASC"], **kwargs)


def sweep_rows(client: Any, parent_run_id: str) -> list[Row]:
    parent = client.get_run(parent_run_id)
    runs = jobs_of(client, parent)
    reused = [client.get_run(v) for k, v in sorted(parent.data.tags.items()) if k.startswith("optipipe.reused.")]
    return with_scaling([row_of(r, reused=True) for r in reused] + [row_of(r) for r in runs])


# What a scaling sweep varies: the number of processes and how the model is spread over them.
PROCESSES, SPREAD = "launcher.nproc_per_node=", "shard="
# Overrides that say how a sweep was run, not what its jobs measure: a resumed sweep's new jobs carry
# them and its reused jobs do not, yet both are the same configurations (matched and labelled as such);
# and where a run was logged (a store's path in every row of the table says nothing about the job).
BOOKKEEPING = ("pipeline.resume=", "pipeline.resume_from=", "tracker.")


def measured_overrides(row: Row) -> list[str]:
    """The row's overrides that choose what was measured (``BOOKKEEPING`` left out)."""
    return [t for t in row.overrides.split() if not t.lstrip("+~").startswith(BOOKKEEPING)]


def processes(row: Row) -> int | None:
    return next((int(t[len(PROCESSES):]) for t in row.overrides.split() if t.startswith(PROCESSES)), None)


def with_scaling(rows: list[Row]) -> list[Row]:
    """In a sweep over ``launcher.nproc_per_node``, each row's throughput over the one-process rows
    that differ from it only in processes and ``shard``: ``x_one_process``. The base is the fastest of
    those, so a one-process job slowed by a neighbour loading beside it cannot inflate a speed-up."""
    def rest(row: Row) -> tuple[str, ...]:
        return tuple(sorted(t for t in measured_overrides(row) if not t.startswith((PROCESSES, SPREAD))))

    base: dict[tuple[str, ...], float] = {}
    for row in rows:
        if processes(row) == 1 and row.status == "FINISHED" and row.value("tokens_per_s") > 0:
            base[rest(row)] = max(base.get(rest(row), 0.0), row.value("tokens_per_s"))
    if not any((processes(row) or 1) > 1 for row in rows):
        return rows  # not a sweep over processes
    for row in rows:
        if rest(row) in base and row.status == "FINISHED" and not math.isnan(row.value("tokens_per_s")):
            row.values["x_one_process"] = row.value("tokens_per_s") / base[rest(row)]
    return rows


def latest_sweep(client: Any, experiment: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no experiment named {experiment!r} in this store")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`optipipe.sweep` = 'true'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise LookupError(f"experiment {experiment!r} has no sweep (run one with optipipe -m …)")
    return parents[0].info.run_id


def best(rows: list[Row]) -> Row | None:
    """The fastest finished configuration that did not fail its quality gate."""
    ok = [r for r in rows if r.status == "FINISHED" and r.gate != "fail" and not math.isnan(r.value("tokens_per_s"))]
    return max(ok, key=lambda r: r.value("tokens_per_s"), default=None)


def pareto(rows: list[Row]) -> list[Row]:
    """Rows no other row beats on both throughput (higher) and peak memory (lower)."""
    pts = [r for r in rows if r.status == "FINISHED" and not math.isnan(r.value("tokens_per_s"))
           and not math.isnan(r.value("peak_memory_gib"))]
    def dominated(r: Row) -> bool:
        fast, small = r.value("tokens_per_s"), r.value("peak_memory_gib")
        return any(o.value("tokens_per_s") >= fast and o.value("peak_memory_gib") <= small
                   and (o.value("tokens_per_s"), o.value("peak_memory_gib")) != (fast, small) for o in pts)

    front = [r for r in pts if not dominated(r)]
    return sorted(front, key=lambda r: r.value("peak_memory_gib"))


def varied_overrides(rows: list[Row]) -> list[list[str]]:
    """Each row's measured overrides without those every row shares: what the sweep varied."""
    tokens = [measured_overrides(r) for r in rows]
    common = set.intersection(*(set(t) for t in tokens)) if tokens else set()
    return [[t for t in ts if t not in common] for ts in tokens]


def short_labels(rows: list[Row]) -> list[str]:
    """What each row varied, as one line (its run id where it varied nothing); reused rows say so."""
    return [(" ".join(ts) or r.run_id[:8]) + (" (reused)" if r.reused else "")
            for ts, r in zip(varied_overrides(rows), rows)]


def plot_label(label: str) -> str:
    """A short label as a plot shows it: one override per line, whole. Cutting it to a width dropped
    the value that tells jobs apart (``launcher.nproc_per_node=1`` from ``=4`` in a scaling sweep)."""
    varied, reused, _ = label.partition(" (reused)")
    return "\n".join(varied.split()) + reused


def _cell(v: float) -> str:
    return "" if math.isnan(v) else (f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}")


def markdown(rows: list[Row]) -> str:
    cols = [c for c, _ in COLUMNS if any(c in r.values for r in rows)]
    lines = ["| overrides | status | gate | " + " | ".join(cols) + " |",
             "|" + "---|" * (3 + len(cols))]
    for r in rows:
        lines.append(f"| {' '.join(measured_overrides(r))} | {r.status_text} | {r.gate} | "
                     + " | ".join(_cell(r.value(c)) for c in cols) + " |")
    return "\n".join(lines)


def csv_text(rows: list[Row]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    cols = [c for c, _ in COLUMNS]
    writer.writerow(["run_id", "overrides", "status", "gate", "reused", *cols])
    for r in rows:
        writer.writerow([r.run_id, r.overrides, r.status, r.gate, r.reused, *(r.values.get(c, "") for c in cols)])
    return buf.getvalue()


def plots(rows: list[Row], folder: Path) -> list[Path]:
    """Throughput against peak memory (marker: gate, line: Pareto front), latency percentiles and,
    in a sweep over processes, the speed-up against processes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {"pass": ("o", "tab:green"), "fail": ("x", "tab:red"), "not set": ("s", "tab:blue")}
    labels = dict(zip((r.run_id for r in rows), map(plot_label, short_labels(rows))))
    for gate, (marker, color) in markers.items():
        pts = [r for r in rows if r.gate == gate and r.status == "FINISHED"]
        ax.scatter([r.value("peak_memory_gib") for r in pts], [r.value("tokens_per_s") for r in pts],
                   marker=marker, color=color, label=f"gate {gate}", s=60)
        for r in pts:
            ax.annotate(labels[r.run_id], (r.value("peak_memory_gib"), r.value("tokens_per_s")), fontsize=7)
    front = pareto(rows)
    if front:
        ax.plot([r.value("peak_memory_gib") for r in front], [r.value("tokens_per_s") for r in front],
                "--", color="gray", label="Pareto front")
    ax.set_xlabel("peak memory (GiB)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("throughput against memory")
    out.append(_save(plt, fig, ax, folder / "throughput_vs_memory.png"))

    done = [r for r in rows if r.status == "FINISHED"]
    lines = max((labels[r.run_id].count("\n") + 1 for r in done), default=1)
    fig, ax = plt.subplots(figsize=(8, (0.3 + 0.2 * lines) * len(done) + 2))
    names = [labels[r.run_id] for r in done]
    y = range(len(done))
    latency = "itl_ms" if any("itl_ms_p50" in r.values for r in done) else "batch_latency_ms"  # decoder or encoder
    ax.barh([i + 0.2 for i in y], [r.value(f"{latency}_p90") for r in done], height=0.4, label="p90")
    ax.barh([i - 0.2 for i in y], [r.value(f"{latency}_p50") for r in done], height=0.4, label="p50")
    ax.set_yticks(list(y), names, fontsize=7)
    ax.set_xlabel("inter-token latency (ms)" if latency == "itl_ms" else "batch latency (ms)")
    out.append(_save(plt, fig, ax, folder / "latency_percentiles.png"))
    if any("x_one_process" in r.values for r in rows):
        out.append(scaling_plot(plt, rows, folder / "scaling.png"))
    return out


def scaling_lines(rows: list[Row]) -> dict[str, list[tuple[int, float]]]:
    """(processes, x_one_process) points, one line per way of spreading (``shard=``) and whatever
    else the sweep varied besides processes."""
    lines: dict[str, list[tuple[int, float]]] = {}
    for row, varied in zip(rows, varied_overrides(rows)):
        n = processes(row)
        if n is not None and "x_one_process" in row.values:  # a reused job and a new one share a line
            rest = " ".join(t for t in varied if not t.startswith(PROCESSES)) or "all"
            lines.setdefault(rest, []).append((n, row.value("x_one_process")))
    return {name: sorted(pts) for name, pts in sorted(lines.items())}


def scaling_plot(plt, rows: list[Row], path: Path) -> Path:
    """A sweep over processes: each line's speed-up against processes; the diagonal is linear."""
    lines = scaling_lines(rows)
    counts = sorted({n for pts in lines.values() for n, _ in pts})
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([1, counts[-1]], [1, counts[-1]], ":", color="gray", label="linear")
    for name, pts in lines.items():
        ax.plot([n for n, _ in pts], [x for _, x in pts], "o-", label=name)
    ax.set_xlabel("processes (GPUs)")
    ax.set_ylabel("decode tokens/s over the one-process job")
    ax.set_xticks(counts)
    ax.set_title("scaling")
    return _save(plt, fig, ax, path)


def _save(plt, fig, ax, path: Path) -> Path:
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(rows: list[Row], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.md").write_text(markdown(rows) + "\n")
    (folder / "summary.csv").write_text(csv_text(rows))
    return [folder / "summary.md", folder / "summary.csv", *plots(rows, folder)]


def heading(client: Any, parent_run_id: str) -> str:
    """Where a sweep's numbers come from: its command, cards, date and versions (from its first job)."""
    parent = client.get_run(parent_run_id)
    jobs = jobs_of(client, parent, max_results=1)
    tags = jobs[0].data.tags if jobs else {}
    day = time.strftime("%Y-%m-%d", time.gmtime(parent.info.start_time / 1000))
    params = parent.data.params
    command = " ".join(["optipipe -m", params.get("sweep.hydra_overrides", ""), params.get("sweep.overrides", "")])
    command = " ".join(command.split())
    return (f"`{command}` · {tags.get('cards', 'cards not recorded')} · {day} · "
            f"{tags.get('versions', 'versions not recorded')} · sweep {parent_run_id}")


def write_section(path: Path, text: str, section: str) -> None:
    """Replace what lies between ``<!-- section:begin -->`` and ``<!-- section:end -->`` in ``path``."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    doc = path.read_text()
    if begin not in doc or end not in doc.split(begin, 1)[1]:
        raise LookupError(f"{path} has no {begin} … {end} section to replace: add the two lines where the "
                          f"table belongs")
    head, rest = doc.split(begin, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}")


def best_line(rows: list[Row]) -> str:
    b = best(rows)
    if b is None:
        return "no finished configuration passed its quality gate"
    reused = f", reused from run {b.run_id}" if b.reused else ""
    return f"best: optipipe {b.overrides}   ({_cell(b.value('tokens_per_s'))} tok/s{reused})"
