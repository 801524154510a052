"""``optipipe bench``: side by side, in one process on one card, what a user gets from plain
transformers and what the pipeline's configurations give, on the same model and prompts.

    optipipe bench --model llama3_8b_random --batches 1,32 \
        --configs "convert=sdpa" "generate=fast" "quantize=int4_torchao generate=fast"

Baselines (what a user types without us), always first:
  plain              from_pretrained(dtype, device_map=device) then generate()
  hf_static_compile  the same with cache_implementation="static" (transformers then auto-compiles
                     the decode step on CUDA; on CPU it stays eager, and the row says so)
Each configuration is composed exactly like ``optipipe <overrides>`` and measured by the same
generate stage, so tokens/s, TTFT, ITL, peak memory and MBU mean the same in every row.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from pipeline import console, stopping
from pipeline.config import compose
from pipeline.contract import STAGE_ORDER, ConfigProblems, DistInfo, LoadPlan, RunContext
from pipeline.runner import make_plan, open_context
from pipeline.validate import resolve

BASELINES: dict[str, dict[str, Any]] = {"plain": {}, "hf_static_compile": {"cache_implementation": "static"}}
COLUMNS = ("decode_tokens_per_s", "decode_tokens_per_s_spread_pct", "e2e_tokens_per_s", "ttft_ms_p50", "itl_ms_p50", "itl_ms_p90",
           "memory_peak_allocated_gib", "memory_peak_rss_gib", "mbu", "bandwidth_gb_per_s",
           "floor_tokens_per_s", "recompiles_timed")


@dataclass
class Entry:
    label: str
    overrides: list[str]
    baseline: dict[str, Any] | None = None  # generate kwargs of a plain-transformers baseline


def common(args: argparse.Namespace) -> list[str]:
    """What every row shares: model, dtype, exact prompt/output lengths, repeats; no tracking per row."""
    return [f"model={args.model}", "tracker=none", f"load.dtype={args.dtype}", "generate.benchmark=true",
            f"generate.prompt_tokens={args.prompt}", f"generate.max_new_tokens={args.new}",
            f"generate.repeats={args.repeats}", f"generate.warmup={args.warmup}",
            *(["generate.profile=true"] if args.profile else []), *args.set]


def entries(args: argparse.Namespace) -> list[Entry]:
    out = [Entry(name, [], kwargs) for name, kwargs in BASELINES.items() if name in args.baselines]
    return out + [Entry(c, shlex.split(c)) for c in args.configs]


def open_entry(entry: Entry, args: argparse.Namespace, workdir: Path):
    """(resolved config, context with the model loaded and every pre-generate stage applied, the
    tags those stages recorded: which kernels and methods the row ran with)."""
    resolved = resolve(compose(common(args) + entry.overrides))
    if entry.baseline is None:
        ctx = open_context(resolved, make_plan(resolved), workdir)
        tags: dict[str, str] = {}
        for name in STAGE_ORDER[:4]:  # load, quantize, convert, shard: once per model
            tags.update(resolved.stages[name].apply(ctx).tags)
        return resolved, ctx, tags
    load = resolved.stages["load"]
    plan = LoadPlan(model=resolved.model)
    load.plan(plan)
    plan.kwargs["device_map"] = {"": plan.device}  # what a user types; attention: transformers' default
    ctx = RunContext(cfg=resolved.cfg, output_dir=workdir, dist=DistInfo(device=plan.device))
    ctx.model, ctx.tokenizer = load.materialize(plan, record=False)
    ctx.generate_kwargs = dict(entry.baseline)
    return resolved, ctx, {}


def measure_entry(entry: Entry, args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """One configuration at every batch size; each row joins ``rows`` as it is measured, so a later
    failure or a stop keeps it."""
    from pipeline import measure

    workdir = Path(args.out) / "work" / slug(entry.label)
    workdir.mkdir(parents=True, exist_ok=True)
    resolved, ctx, tags = open_entry(entry, args, workdir)
    generate = resolved.stages["generate"]
    for batch in args.batches:
        generate.cfg.batch_size = batch
        result = generate.apply(ctx)
        row = {"config": entry.label, "batch": batch, "weight_bytes": float(measure.weight_bytes(ctx.model)),
               "compiled": str(getattr(ctx.model, "_compiled_call", None) is not None
                               or generate.engine(list(resolved.pipeline.allow)).compiled()),
               **{k: v for k, v in result.metrics.items() if k in COLUMNS or k.startswith("profile_")},
               "tags": {**tags, **result.tags}}
        for report in (a for a in result.artifacts if a.name.startswith("generate_profile_")):
            # beside bench.md, named by row; the title says which configuration it was
            text = report.read_text().replace("# generate,", f"# {entry.label},", 1)
            (Path(args.out) / f"profile_{slug(entry.label)}_b{batch}.md").write_text(text)
        rows.append(row)
        print(json.dumps(row), flush=True)


def unmeasured(entry: Entry, args: argparse.Namespace, rows: list[dict[str, Any]], why: str,
               status: str) -> list[dict[str, Any]]:
    """A row for each batch size of ``entry`` that has no numbers, saying why and how its run ends
    (``status``: FAILED, or KILLED for a row a Ctrl-C or SIGTERM cut short or never reached)."""
    done = {r["batch"] for r in rows if r["config"] == entry.label}
    return [{"config": entry.label, "batch": b, "error": why, "status": status}
            for b in args.batches if b not in done]


def free_memory() -> None:
    """What one configuration's model held, before the next loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in label)


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's decode tokens/s over plain transformers' at the same batch size, and how uncertain
    that ratio is: ``x_plain_pm`` is half the repeats' spread of both rows, relative, times the ratio
    (the row's and plain's medians could each sit anywhere in their repeats' range)."""
    nan = float("nan")
    plain = {r["batch"]: r for r in rows if r["config"] == "plain" and "error" not in r}
    for r in (r for r in rows if "error" not in r):  # a row without numbers has no ratio either
        base = plain.get(r["batch"], {})
        r["x_plain"] = r.get("decode_tokens_per_s", nan) / base.get("decode_tokens_per_s", nan)
        spread = r.get("decode_tokens_per_s_spread_pct", 0.0) + (
            base.get("decode_tokens_per_s_spread_pct", 0.0) if base is not r else 0.0)
        r["x_plain_pm"] = 0.0 if base is r else r["x_plain"] * spread / 200
    return rows


def ratio_cell(r: dict[str, Any]) -> str:
    """``2.31 ± 0.05``; a ratio whose range holds 1.0 is marked as no measured difference."""
    ratio, pm = r["x_plain"], r.get("x_plain_pm", 0.0)
    if ratio != ratio:
        return "n/a"
    if r["config"] == "plain" or not pm:
        return f"{ratio:.2f}"
    same = " (≈ plain: within the repeats' spread)" if ratio - pm <= 1.0 <= ratio + pm else ""
    return f"{ratio:.2f} ± {pm:.2f}{same}"


def cell(value: Any, digits: int) -> str:
    """A number, or n/a where there is none (one new token has no decode rate): never "nan"."""
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("config", "batch", "compiled", "decode tok/s", "× plain", "TTFT p50 ms", "ITL p50 ms", "ITL p90 ms",
            "peak GiB", "weights GiB", "floor tok/s", "MBU")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    nan = float("nan")
    for r in rows:
        if "error" in r:  # no numbers: the reason is listed under the table
            lines.append(f"| {r['config']} | {r['batch']} | " + " | ".join(["n/a"] * (len(head) - 2)) + " |")
            continue
        peak = r.get("memory_peak_allocated_gib", r.get("memory_peak_rss_gib", nan))
        cells = (r["config"], r["batch"], r["compiled"], cell(r.get("decode_tokens_per_s"), 1), ratio_cell(r),
                 cell(r.get("ttft_ms_p50"), 1), cell(r.get("itl_ms_p50"), 2), cell(r.get("itl_ms_p90"), 2),
                 cell(peak, 2), cell(r["weight_bytes"] / 2**30, 2), cell(r.get("floor_tokens_per_s"), 1),
                 cell(r.get("mbu"), 2))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    bandwidth = next((r["bandwidth_gb_per_s"] for r in rows if r.get("bandwidth_gb_per_s")), None)
    if bandwidth:  # CUDA rows: the limit each row is held against
        lines += ["", f"floor tok/s: the rate at which one decode step only reads its bytes (weights + KV cache) at "
                      f"the card's measured copy bandwidth, {bandwidth:.0f} GB/s; MBU = decode tok/s ÷ floor tok/s"]
    missing = [r for r in rows if "error" in r]
    if missing:
        lines += ["", "rows without numbers:"] + [f"- {r['config']}, batch {r['batch']}: {r['error']}" for r in missing]
    return "\n".join(lines)


def track(args: argparse.Namespace, rows: list[dict[str, Any]], files: list[Path], status: str) -> str | None:
    """One parent run for the bench (``status``: FINISHED, or KILLED when it was stopped), one child
    per (configuration, batch): ``optipipe report --parent`` reads it like a sweep. A row without
    numbers is a child FAILED (or KILLED, the row a stop cut short) with its reason."""
    from pipeline.config import TrackerSettings
    from pipeline.contract import StageResult
    from pipeline.environment import describe
    from pipeline.tracking import JobInfo, MlflowTracker

    settings = TrackerSettings(uri=args.tracker_uri, experiment=args.experiment)
    parent = MlflowTracker(settings)
    parent.start(JobInfo(run_name=f"bench {args.model}", params={"bench.args": " ".join(sys.argv[1:])[:6000]},
                         tags={"optipipe.sweep": "true", "optipipe.bench": "true",
                               "gpu": ", ".join(g["name"] for g in describe()["gpus"]) or "none"},
                         artifacts=files))
    for r in rows:
        child = MlflowTracker(settings)
        child.start(JobInfo(run_name=f"{r['config']} b{r['batch']}", params={"bench.config": r["config"],
                            "generate.batch_size": r["batch"], "model": args.model},
                            tags={**r.get("tags", {}), "optipipe.overrides": f"{r['config']} batch={r['batch']}",
                                  "bench.compiled": r.get("compiled", "n/a")}, artifacts=[],
                            parent_run_id=parent.run_id))
        if "error" in r:
            child.finish(r["status"], error=r["error"])
            continue
        numbers = {k: v for k, v in r.items() if isinstance(v, (int, float)) and k != "batch"}
        child.log_result("generate", StageResult(metrics=numbers))
        child.finish("FINISHED")
    parent.finish(status)
    return parent.run_id


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="optipipe bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama3_8b_random", help="a conf/model option (default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (exact)")
    p.add_argument("--new", type=int, default=256, help="new tokens (exact: EOS ignored)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (compilation happens here)")
    p.add_argument("--configs", nargs="*", default=["convert=sdpa", "convert=compile", "generate=fast"],
                   help='each: the overrides of one configuration, quoted, e.g. "quantize=int4_torchao generate=fast"')
    p.add_argument("--baselines", default="plain,hf_static_compile", help="subset of plain,hf_static_compile")
    p.add_argument("--set", nargs="*", default=[], help="overrides applied to every row, e.g. load.device=cpu")
    p.add_argument("--out", default="outputs/bench",
                   help="each invocation writes a new <date>_<time>_<pid> folder under it (bench.json, bench.md)")
    p.add_argument("--tracker-uri", default=None, help="MLflow store (default: outputs/mlflow.db)")
    p.add_argument("--experiment", default="optipipe-bench")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--profile", action="store_true",
                   help="after timing, one generate under the profiler per row: profile_<config>_b<batch>.md")
    p.add_argument("--config-timeout", type=float, default=None, metavar="SECONDS",
                   help="a configuration still running after this long (load, compile and every batch size) "
                        "fails with that reason and the bench goes on (default: no limit)")
    args = p.parse_args(argv)
    if args.config_timeout is not None and not args.config_timeout > 0:
        p.error(f"--config-timeout must be a positive number of seconds, not {args.config_timeout}")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.baselines = [b for b in args.baselines.split(",") if b]
    unknown = [b for b in args.baselines if b not in BASELINES]
    if unknown:
        p.error(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}")
    return args


def header(argv: list[str]) -> str:
    """What the table was measured on and with: enough to tell two bench.md files apart."""
    from pipeline.environment import describe

    env = describe()
    cards = ", ".join(g["name"] for g in env["gpus"]) or f"CPU ({env['cpu_count']} cores)"
    versions = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    return "\n".join([f"# optipipe bench · {time.strftime('%Y-%m-%d %H:%M')}", "",
                      f"command: `optipipe bench {' '.join(argv)}`", f"card: {cards}",
                      f"versions: {versions}", f"commit: {env['git_commit'] or 'not a git checkout'}"])


class ConfigTimeout(BaseException):
    """A configuration ran past ``--config-timeout``. Not an Exception: code inside a configuration
    (a compiler falling back on any error, say) must not swallow it."""


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise ConfigTimeout in this (the main) thread once ``seconds`` have passed; None: no limit.
    A call that never returns to Python (a hung collective) is beyond its reach."""
    if seconds is None:
        yield
        return

    def expire(signum, frame) -> None:
        raise ConfigTimeout(f"still running after --config-timeout {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def write(out: Path, argv: list[str], args: argparse.Namespace, rows: list[dict[str, Any]], start: float,
          state: str) -> str:
    """bench.json and bench.md as they stand (``state``: running, complete, or how it was stopped),
    rewritten after every configuration so a bench that dies keeps what it measured."""
    md = table(with_ratios(rows))
    (out / "bench.json").write_text(json.dumps({"args": vars(args), "state": state, "seconds": time.time() - start,
                                                "rows": rows}, indent=2, default=str))
    (out / "bench.md").write_text(header(argv) + f"\n\nstate: {state}\n\n" + md + "\n")
    return md


def main(argv: list[str]) -> int:
    args = parse(argv)
    try:  # every configuration is validated before the first model loads (and before any folder exists)
        for entry in entries(args):
            resolve(compose(common(args) + entry.overrides))
    except ConfigProblems as e:
        console.print_problems(e.problems)
        return 2
    out = Path(args.out) / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{os.getpid()}"  # never over an earlier bench
    out.mkdir(parents=True)
    args.out = str(out)
    # `timeout`, a scheduler's cancel: stop as on Ctrl-C, keeping the rows measured so far
    previous = signal.signal(signal.SIGTERM, stopping.raise_terminated)
    try:
        return measure_all(args, argv, out)
    finally:
        signal.signal(signal.SIGTERM, previous)


def measure_all(args: argparse.Namespace, argv: list[str], out: Path) -> int:
    """Every configuration in turn; a failing one gives rows without numbers and the bench goes on, a
    stop keeps what was measured. 0: every row measured, 1: some failed, 130/143: stopped."""
    start, rows, stopped, state = time.time(), [], None, "complete"
    try:
        for entry in entries(args):
            try:
                with time_limit(args.config_timeout):
                    measure_entry(entry, args, rows)
            except (Exception, ConfigTimeout) as e:  # one that cannot run here (memory, a kernel, a hang) ends its rows only
                first_line = (str(e).strip().splitlines() or [""])[0][:300]
                why = f"failed: {type(e).__name__}: {first_line}"
                console.err.print(f"optipipe bench: {entry.label}: {why}")
                rows += unmeasured(entry, args, rows, why, "FAILED")
            free_memory()
            write(out, argv, args, rows, start, "running")
    except KeyboardInterrupt as e:
        stopped, state = e, stopping.interrupted_why(e)
        console.err.print(f"optipipe bench: {state}; the rows measured so far are kept")
        for entry in entries(args):  # the row it cut short and those it never reached
            rows += unmeasured(entry, args, rows, f"stopped: {state}", "KILLED")
    with stopping.signals_held():  # a second signal must not leave the files or the runs half written
        md = write(out, argv, args, rows, start, state)
        print("\n" + md, flush=True)  # plain print: a Markdown table must not be wrapped
        if not args.no_track:
            files = [out / "bench.json", out / "bench.md", *sorted(out.glob("profile_*.md"))]
            run_id = track(args, rows, files, "KILLED" if stopped else "FINISHED")
            console.out.print(f"\nMLflow: parent run {run_id} (optipipe report --parent {run_id})")
    if stopped is not None:
        return stopping.exit_code(stopped)
    return 1 if any("error" in r for r in rows) else 0
