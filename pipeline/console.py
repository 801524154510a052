"""What the user reads in the terminal: problems, the dry-run plan, the end-of-run summary."""

from __future__ import annotations

import dataclasses
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline.contract import LoadPlan, Problem
from pipeline.redact import redact, redact_text
from pipeline.runner import RunOutcome
from pipeline.resolved import Resolved

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

KEY_METRICS = ("decode_tokens_per_s", "ttft_ms_p50", "itl_ms_p50", "memory_peak_allocated_gib",
               "memory_peak_rss_gib", "perplexity")


def print_problems(problems: list[Problem]) -> None:
    errors = [p for p in problems if p.severity != "warning"]
    err.print(f"[bold red]optipipe: {len(errors)} problem(s) in the configuration; nothing was loaded[/]")
    _print_each(problems)


def print_warnings(warnings: list[Problem]) -> None:
    if warnings:
        err.print(f"[bold yellow]optipipe: {len(warnings)} warning(s)[/]")
        _print_each(warnings)


def _print_each(problems: list[Problem]) -> None:
    for p in problems:
        label = "[yellow]warning[/] " if p.severity == "warning" else ""
        err.print(f"  {label}[bold]{escape(p.key)}[/]: {escape(redact_text(p.message))}")
        if p.fix:
            err.print(f"      fix: [green]{escape(redact_text(p.fix))}[/]")


def print_plan(resolved: Resolved, plan: LoadPlan) -> None:
    table = Table(title="optipipe plan (dry run: nothing loaded)")
    for col in ("stage", "class", "settings"):
        table.add_column(col)
    for name, stage in resolved.stages.items():
        cls = type(stage)
        fields = dataclasses.asdict(stage.cfg) if dataclasses.is_dataclass(stage.cfg) else dict(vars(stage.cfg))
        settings = ", ".join(f"{k}={v}" for k, v in redact(fields).items())
        table.add_row(name, f"{cls.__module__}.{cls.__qualname__}", settings or "-")
    out.print(table)
    out.print(f"model: {resolved.model.id} (source={resolved.model.source}, task={resolved.model.task})")
    out.print(f"device: {plan.device}")
    out.print("from_pretrained kwargs:")
    for k, v in plan.kwargs.items():
        out.print(f"  {k} = {redact(v, k)!r}   [dim](from {plan.contributed_by[k]})[/]")


def print_summary(outcome: RunOutcome, where: str, run_id: str | None) -> None:
    table = Table(title=f"optipipe run: {outcome.status}")
    for col in ("stage", "seconds", "result"):
        table.add_column(col)
    for name, r in outcome.results.items():
        table.add_row(name, f"{r.seconds:.2f}", escape(redact_text(r.summary)))
    out.print(table)
    if outcome.error:
        err.print(f"[bold red]{escape(redact_text(outcome.error))}[/]")  # errors hold [stage] brackets
    if run_id:
        out.print(f"MLflow run {run_id}")
    out.print(f"dashboard: [bold]{where}[/]", soft_wrap=True)  # one line to copy, whatever the terminal width
    sys.stdout.flush()
