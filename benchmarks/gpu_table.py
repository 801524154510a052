"""The multi-GPU table: one GPU, tensor parallel (ours, and transformers' own), pipeline placement
and data parallel over 2 (and 4) GPUs of one host, Llama-3-8B shape (random bf16 weights), prompt
128, 256 new tokens; each row an ordinary `optipipe` job logged to one MLflow store; ratios are
against the one-GPU `generate=fast` row of the same batch measured by the same invocation.

    python benchmarks/gpu_table.py --out DIR [--rows a,b,...] [--devices 2,3] [--gptfast DIR [--gptfast-tp 4]] [--into BENCHMARKS.md]
    python benchmarks/gpu_table.py --render DIR/gpu_table.json [...] --into BENCHMARKS.md   (tables only)
    python benchmarks/gpu_table.py --sequential --rows one_gpu_b32,one_gpu_b32+joined,tp2_b32+joined   (A/B)

Rows start in the order given, each as soon as enough of the host's GPUs are free, so on a host
with more GPUs than a row needs, rows run side by side on disjoint GPUs, each timed only while no
other row loads or compiles (pipeline/quiet_timing.py); `--sequential` runs them one at a time. With `--set
generate.profile=true` each row's profile reports (one per rank) are gathered into `OUT/profile_ROW.md`.

`--gptfast DIR` adds gpt-fast's own one-GPU and tensor-parallel rows (a copy of
../shared/anchors/gptfast, measuring only). `--into` replaces the section between the
`--section` markers (default `gpu_table`) of that file with the tables; `--render A.json B.json
--merge` joins results of one host into one table.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline import quiet_timing  # noqa: E402
from pipeline.launch import OUTCOME_FILE  # noqa: E402
from pipeline.report import write_section  # noqa: E402
from pipeline.tracking import _client  # noqa: E402
COMMON = ["model=llama3_8b_random", "load.dtype=bfloat16", "generate.benchmark=true", "generate.prompt_tokens=128",
          "generate.max_new_tokens=256", "generate.warmup=1", "generate.repeats=3",
          "++launcher.collective_timeout_s=600", "tracker.experiment=gpu-table"]
TP2 = ["shard=tensor_parallel", "launcher=torchrun", "launcher.nproc_per_node=2"]
TP4 = ["shard=tensor_parallel", "launcher=torchrun", "launcher.nproc_per_node=4"]
DP = ["shard=data_parallel", "launcher=torchrun"]
FAST = ["generate=fast"]
NO_CD = ["generate.fast_coordinate_descent=false"]
# name: (GPUs, batch, overrides, what the row is)
ROWS = {
    "one_gpu_b1": (1, 1, FAST, "one GPU, `generate=fast`"),
    "one_gpu_b32": (1, 32, FAST, "one GPU, `generate=fast`"),
    "one_gpu_b1_cublas": (1, 1, FAST + NO_CD, "one GPU, `generate=fast`, cuBLAS matmuls (no coordinate descent)"),
    "tp2_b1": (2, 1, TP2 + FAST, "TP2, our layers + all-reduce (`shard=tensor_parallel generate=fast`)"),
    "tp2_b32": (2, 32, TP2 + FAST, "TP2, our layers + all-reduce"),
    "tp2_b1_cublas": (2, 1, TP2 + FAST + NO_CD, "TP2, our layers + all-reduce, cuBLAS matmuls"),
    "tp2_b1_per_rank": (2, 1, TP2 + FAST + ["shard.agreed_tuning=false"],
                        "TP2, our layers + all-reduce, each rank tunes its kernels alone"),
    "tp2_nccl_b1": (2, 1, TP2 + FAST + ["shard.all_reduce=process_group"], "TP2, our layers, NCCL all-reduce"),
    "tp2_hf_layers_b1": (2, 1, TP2 + FAST + ["shard.runtime=transformers"],
                         "TP2, transformers' DTensor layers + our engine"),
    "tp2_hf_compile_b1": (2, 1, TP2 + ["shard.runtime=transformers", "convert=compile"],
                          "TP2, transformers `tp_plan=\"auto\"` + static cache + compile"),
    "pipeline2_b1": (2, 1, ["shard=pipeline"] + FAST, "`shard=pipeline` (sequential placement, fits GPU 0)"),
    "dp2_b32": (2, 32, DP + ["launcher.nproc_per_node=2"] + FAST, "data parallel ×2 (batch 32 per replica)"),
    "tp4_b1": (4, 1, TP4 + FAST, "TP4, our layers + all-reduce"),
    "tp4_b32": (4, 32, TP4 + FAST, "TP4, our layers + all-reduce"),
    "dp4_b32": (4, 32, DP + ["launcher.nproc_per_node=4"] + FAST, "data parallel ×4 (batch 32 per replica)"),
    "dp2xtp2_b32": (4, 32, DP + ["launcher.nproc_per_node=4", "shard.tp_size=2"] + FAST,
                    "2 replicas × TP2, our layers + all-reduce (batch 32 per replica)"),
}
# a row written NAME+VARIANT (or NAME+A+B) runs NAME with the variants' overrides too (same-host A/B
# in one command)
VARIANTS = {
    "joined": (["generate.fast_fuse_projections=true"], "q/k/v and gate/up joined"),
    "apart": (["generate.fast_fuse_projections=false"], "q/k/v and gate/up apart"),
    "prefill": (["generate.fast_compile_prefill=true"], "compiled prefill"),
    "prefillgraph": (["generate.fast_compile_prefill=true", "generate.fast_prefill_graph=true"],
                     "compiled prefill as a CUDA graph (prompts padded to a multiple of 64)"),
    "cublas": (NO_CD, "cuBLAS matmuls"),
    "gather": (["shard.split_greedy=false"], "greedy over gathered logits"),
    "unfusednorm": (["shard.fuse_norm=false"], "all-reduce, add and RMSNorm as separate kernels"),
    # TP's default levers (together, split_kv, PDL) as variants: on for one GPU, off for TP (A/B either way)
    "together": (["shard.fuse_norm_wait=together"], "the fused kernel polls every peer's row at once"),
    "inturn": (["shard.fuse_norm_wait=in_turn"], "the fused kernel waits for one peer after another"),
    "pdl": (["generate.fast_pdl=true"], "programmatic dependent launch"),
    "nopdl": (["generate.fast_pdl=false"], "stream-order launch"),
    "realize30": (["generate.fast_realize_opcount=null"], "inductor's own realize threshold (30)"),
    "splitkv": (["generate.fast_decode_attention=split_kv"], "our split decode-attention kernel"),
    "sdpa": (["generate.fast_decode_attention=sdpa"], "SDPA decode attention"),
    # inductor also tunes the matmuls (Triton templates against cuBLAS): for the split-K kernels at batch 32
    "autotune": (["generate.fast_compile_mode=max-autotune"], "max-autotune"),
}


def row_spec(name: str) -> tuple[int, int, list[str], str]:
    """(GPUs, batch, overrides, what) of a row name, ``NAME`` or ``NAME+VARIANT[+VARIANT…]``; KeyError
    if unknown."""
    base, *variants = name.split("+")
    gpus, batch, overrides, what = ROWS[base]
    for variant in variants:
        extra, how = VARIANTS[variant]
        overrides, what = overrides + extra, f"{what}, {how}"
    return gpus, batch, overrides, what


def collective(tags: dict[str, str]) -> str:
    """The all-reduce column: the collective, and whether the add + RMSNorm after it ran fused."""
    fused = tags.get("generate.all_reduce_norm", "off")
    return tags.get("shard.collective", "") + (f" + norm ({fused})" if fused != "off" else "")


def one_gpu_batch(name: str) -> str | None:
    """The batch of a one-GPU row (any variant), as text; None for other rows."""
    batch = name.partition("+")[0].removeprefix("one_gpu_b")
    return batch if batch.isdigit() else None


def file_stem(name: str) -> str:
    """A row's folder and log name: ``+`` becomes ``__`` (some file-transfer tools skip names with ``+``)."""
    return name.replace("+", "__")


def job(name: str, out: Path, timeout: int, extra: list[str], devices: list[int], side_by_side: bool = False) -> dict:
    _, batch, overrides, _ = row_spec(name)
    store = f"sqlite:///{out / 'gpu_table.db'}"
    cmd = [sys.executable, "-m", "pipeline", *COMMON, *overrides, f"generate.batch_size={batch}", *extra,
           f"tracker.uri={store}", f"tracker.run_name={name}", f"hydra.run.dir={out / 'runs' / file_stem(name)}",
           "pipeline.allow_outside_outputs=true"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, devices)), "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    if side_by_side:  # a row is timed only while no other row loads or compiles (pipeline/quiet_timing.py)
        env[quiet_timing.ENV] = str(out / quiet_timing.FILE_NAME)
    start = time.time()
    with open(out / f"{file_stem(name)}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return {"name": name, "proc": proc, "start": start, "timeout": timeout, "devices": devices}


TERM_GRACE_S = 30.0  # a job past its time limit, told to stop, gets this long before SIGKILL


def finish(j: dict, out: Path) -> dict:
    try:
        code = j["proc"].wait(timeout=max(1, j["timeout"] - (time.time() - j["start"])))
    except subprocess.TimeoutExpired:  # cut at its time limit (exit code −9 in the table, however it ended)
        j["proc"].terminate()  # optipipe marks its run KILLED and stops its torchrun group; SIGKILL would not
        try:
            j["proc"].wait(timeout=TERM_GRACE_S)
        except subprocess.TimeoutExpired:
            j["proc"].kill()
            j["proc"].wait()
        code = -9
    end = time.time()
    outcome = out / "runs" / file_stem(j["name"]) / OUTCOME_FILE
    row = {"name": j["name"], "exit_code": code, "job_seconds": round(end - j["start"], 1), "devices": j["devices"]}
    if outcome.is_file():  # a torchrun job's results were written here before the group left
        row["exit_after_results_s"] = round(end - outcome.stat().st_mtime, 1)
    return row


def gather_profiles(name: str, out: Path) -> str | None:
    """A row's profile reports (``generate.profile=true``: one per rank) from wherever its job wrote
    them, one after another in ``out/profile_<row>.md``; that name relative to ``out``, None without
    reports. A job's own folder nests deeper, and holds more files, than some file-transfer tools take."""
    found = sorted((out / "runs" / file_stem(name)).rglob("generate_profile_*.md"))
    if not found:
        return None
    target = f"profile_{file_stem(name)}.md"
    (out / target).write_text("\n".join(path.read_text() for path in found))
    return target


def read_run(row: dict, out: Path) -> dict:
    client = _client(f"sqlite:///{out / 'gpu_table.db'}")
    exp = client.get_experiment_by_name("gpu-table")
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{row['name']}'") if exp else []
    if not runs:
        return row
    m, tags = runs[0].data.metrics, runs[0].data.tags
    row.update(status=runs[0].info.status, tok_s=m.get("generate/decode_tokens_per_s"), mbu=m.get("generate/mbu"),
               ttft_ms=m.get("generate/ttft_ms_p50"), itl_ms_p50=m.get("generate/itl_ms_p50"),
               # the card's SM clock while timed, and how often a slowdown reason was on (gpu_clocks.py)
               sm_mhz=m.get("generate/gpu_sm_clock_mhz_p50"), slowed=m.get("generate/gpu_slowdown_share"),
               peak_gib=m.get("generate/memory_peak_allocated_gib"), collective=collective(tags),
               error=tags.get("optipipe.error", "")[:300],
               # graphs compiled during the timed runs (a compiled prefill's new shapes count): JSON only
               recompiles_timed=m.get("generate/recompiles_timed"),
               # where a job's seconds go (load, compile inside the warm-up, timed runs): JSON only
               seconds={k: round(v, 1) for k, v in m.items() if k.endswith(("stage_seconds", "warmup_seconds"))})
    profile = gather_profiles(row["name"], out)
    if profile:
        row["profile"] = profile
    samples = sorted((out / "runs" / file_stem(row["name"])).glob("generate_samples*.jsonl"))
    if samples:
        row["outputs"] = [json.loads(line)["token_ids"] for line in samples[0].read_text().splitlines()]
    return row


GPTFAST_LIMIT_S = 300  # one anchor run: its cold compile takes 2–4 minutes
GPTFAST_EXIT_GRACE_S = 15.0  # how long a run that printed its result may take to exit before it is ended
GPTFAST_RESULT = "{'impl': 'gpt-fast'"


def anchor_output(cmd: list[str], env: dict[str, str]) -> str:
    """What the anchor printed. Its tensor-parallel ranks may never exit after printing their result:
    once the result is out they get ``GPTFAST_EXIT_GRACE_S``, then their process group is ended (not the
    whole ``GPTFAST_LIMIT_S`` of device time)."""
    import signal
    import threading

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own group, apart from ours
    lines: list[str] = []
    result_at: list[float] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(GPTFAST_RESULT) and not result_at:
                result_at.append(time.time())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    start = time.time()
    while proc.poll() is None:
        late = bool(result_at) and time.time() - result_at[0] > GPTFAST_EXIT_GRACE_S
        if late or time.time() - start > GPTFAST_LIMIT_S:
            # SIGTERM: torchrun then ends its ranks, which run in sessions of their own; SIGKILL if it hangs
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait()
    reader.join(timeout=5)
    return "".join(lines)


def gptfast_rows(folder: Path, out: Path, tp_size: int = 2, devices: list[int] | None = None) -> Iterator[list[dict]]:
    """gpt-fast's own one GPU, then its tensor parallel over ``tp_size`` GPUs (the first of
    ``devices``), each run's rows as it ends."""
    env = {**os.environ, "GPTFAST": str(folder), "OUT": str(out),
           "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in (devices or range(tp_size))[:tp_size])}
    for tp, cmd in ((1, [sys.executable, str(folder / "gptfast_anchor.py"), "1"]),
                    (tp_size, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp_size),
                               str(folder / "gptfast_anchor.py"), "1"])):
        text = anchor_output(cmd, env)
        found = [ast.literal_eval(line) for line in text.splitlines() if line.startswith(GPTFAST_RESULT)]
        (out / f"gptfast_tp{tp}.log").write_text(text)
        yield [{"name": f"gptfast_tp{tp}_b1", "tok_s": r["decode_tok_s"], "gpus": tp, "batch": 1} for r in found]


def known_row(name: str) -> bool:
    try:
        row_spec(name)
    except KeyError:
        return False
    return True


def need(name: str, gpus: int) -> int:
    """GPUs a row takes; without CUDA every row takes the one CPU "slot" (rows run one by one)."""
    import torch

    return row_spec(name)[0] if torch.cuda.is_available() else 1


def run(names: list[str], out: Path, timeout: int, gptfast: Path | None, extra: list[str], gpus: int,
        sequential: bool = False, gptfast_tp: int = 2, devices: list[int] | None = None) -> dict:
    """Start rows in order as GPUs free up (``sequential``: each alone on the host); collect each as it
    ends. ``devices``: the host's GPUs to use (default the first ``gpus``)."""
    out.mkdir(parents=True, exist_ok=True)
    pending, running, free, rows = list(names), [], list(devices or range(gpus)), []
    while pending or running:
        while pending and need(pending[0], gpus) <= len(free) and not (sequential and running):
            need_now = need(pending[0], gpus)
            running.append(job(pending.pop(0), out, timeout, extra, free[:need_now], not sequential))
            free = free[need_now:]
        ended = next((j for j in running if j["proc"].poll() is not None
                      or time.time() - j["start"] > j["timeout"]), None)
        if ended is None:
            time.sleep(1)
            continue
        running.remove(ended)
        rows.append(read_run(finish(ended, out), out))
        (out / "gpu_table.json").write_text(json.dumps(result(rows), indent=1))  # kept if the rest is cut
        free = sorted(free + ended["devices"])
        print(f"ran {ended['name']} on GPUs {ended['devices']}", flush=True)
    for found in gptfast_rows(gptfast, out, gptfast_tp, devices) if gptfast is not None else ():
        rows += found
        (out / "gpu_table.json").write_text(json.dumps(result(rows), indent=1))
    return result(rows)


def result(rows: list[dict]) -> dict:
    return {"device": gpu_names(), "date": time.strftime("%Y-%m-%d"), "versions": versions(), "rows": rows}


def merged(results: list[dict]) -> dict:
    """The rows of several results as one; refused unless they name the same cards and versions."""
    kinds = {(r["device"], r["versions"]) for r in results}
    if len(kinds) > 1:
        raise SystemExit(f"--merge takes results of one host and software only; these differ: {sorted(kinds)}")
    return {**results[0], "rows": [row for r in results for row in r["rows"]]}


def gpu_count() -> int:
    import torch

    return max(torch.cuda.device_count(), 1)


def gpu_names() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip().replace("\n", " + ")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> str:
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}"


def table(result: dict) -> str:
    rows = result["rows"]
    base: dict[str, float | None] = {}
    for r in rows:  # the first one-GPU row of each batch (any variant)
        if one_gpu_batch(r["name"]):
            base.setdefault(one_gpu_batch(r["name"]), r.get("tok_s"))
    first = {b: next((r.get("outputs") for r in rows if one_gpu_batch(r["name"]) == b), None) for b in base}
    lines = [f"{result['device']} · {result['date']} · {result['versions']}", "",
             "| row | what | GPUs | batch | decode tok/s | × one GPU | MBU/GPU | TTFT ms | SM MHz | all-reduce | "
             "greedy = one GPU | job s | exit after results s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        try:
            spec = row_spec(r["name"])
        except KeyError:
            spec = (r.get("gpus", 1), r.get("batch", 1), [], "gpt-fast's own (anchor)")
        batch = str(spec[1])
        tok = r.get("tok_s")
        ratio = f"{tok / base[batch]:.2f}" if tok and base.get(batch) and not r["name"].startswith("gptfast") else ""
        same = ""
        if r.get("outputs") and first.get(batch) and r["name"].startswith(("tp", "pipeline")):
            same = agreement(r["outputs"], first[batch])
        error = f": {r['error']}" if r.get("error") else ""
        status = "" if r.get("status", "FINISHED") == "FINISHED" else f" ({r.get('status')}{error})"
        lines.append(f"| {r['name']}{status} | {spec[3]} | {spec[0]} | {batch} | {fmt(tok, 1)} | {ratio} | "
                     f"{fmt(r.get('mbu'), 2)} | {fmt(r.get('ttft_ms'), 1)} | {clock_cell(r)} | {r.get('collective', '')} | {same} | "
                     f"{r.get('job_seconds', '')} | {exit_note(r)} |")
    gf = {r["name"]: r["tok_s"] for r in rows if r["name"].startswith("gptfast")}
    for tp in (2, 4):
        if {"gptfast_tp1_b1", f"gptfast_tp{tp}_b1"} <= gf.keys():
            many, one = gf[f"gptfast_tp{tp}_b1"], gf["gptfast_tp1_b1"]
            lines += ["", f"gpt-fast's own TP{tp} / its one GPU: {many / one:.2f}× "
                          f"({many:.1f} / {one:.1f} tok/s, top-k sampling as it ships)"]
    return "\n".join(lines)


def clock_cell(row: dict) -> str:
    """The SM clock's median while timed, and the share of samples a slowdown reason was on."""
    if row.get("sm_mhz") is None:
        return ""
    return f"{row['sm_mhz']:.0f}" + (f" (slowed {row['slowed']:.0%})" if row.get("slowed") else "")


def exit_note(row: dict) -> str:
    """Seconds from results to exit, or that the job was killed at its time limit (code −9): after its
    results, or before it had any."""
    after = row.get("exit_after_results_s", "")
    if row.get("exit_code") != -9:
        return str(after)
    return f"killed at the time limit {after} s after its results" if after != "" else "killed at the time limit before its results"


def agreement(rows: list[list[int]], reference: list[list[int]]) -> str:
    """Rows whose greedy tokens equal the reference's, and the fewest tokens before a row differs."""
    equal = sum(a == b for a, b in zip(rows, reference))
    first = min((next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(rows, reference)),
                default=0)
    return f"{equal}/{len(reference)}" + ("" if equal == len(reference) else f" (first difference at token {first})")


def fmt(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_table")
    ap.add_argument("--gpus", type=int, help="GPUs of this host to use, the first N (default: all)")
    ap.add_argument("--devices", help="which GPUs of this host to use, e.g. 2,3 (another command can have 0,1)")
    ap.add_argument("--rows", default=",".join(ROWS),
                    help=f"any of {', '.join(ROWS)}; NAME+VARIANT adds a variant's overrides to one row "
                         f"({', '.join(f'{k}: {v[1]}' for k, v in VARIANTS.items())})")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per job")
    ap.add_argument("--gptfast", type=Path, help="folder with gpt-fast's anchor (a copy of ../shared/anchors/gptfast)")
    ap.add_argument("--gptfast-tp", type=int, choices=(2, 4), default=2,
                    help="GPUs of gpt-fast's own tensor-parallel row (its one-GPU row always runs)")
    ap.add_argument("--sequential", action="store_true",
                    help="one row at a time (no neighbour compiling or loading beside a timed row)")
    ap.add_argument("--set", nargs="*", default=[], help="more overrides for every job (e.g. a small model)")
    ap.add_argument("--render", type=Path, nargs="*", help="only render these result JSONs (one table each)")
    ap.add_argument("--merge", action="store_true",
                    help="with --render: one table of all rows (results of one host, e.g. successive commands "
                         "on one machine; the first one-GPU row of a batch is the base)")
    ap.add_argument("--into", type=Path, help="replace the --section of this markdown file")
    ap.add_argument("--section", default="gpu_table",
                    help="name in the markers <!-- NAME:begin --> … <!-- NAME:end --> that --into replaces")
    args = ap.parse_args()
    if args.render:
        results = [json.loads(p.read_text()) for p in args.render]
        if args.merge:
            results = [merged(results)]
    else:
        unknown = [n for n in args.rows.split(",") if not known_row(n)]
        if unknown:
            raise SystemExit(f"unknown rows {unknown}: choose from {', '.join(ROWS)}, each optionally "
                             f"+{'|+'.join(VARIANTS)}")
        devices = [int(d) for d in args.devices.split(",")] if args.devices else None
        if devices and args.gpus:
            raise SystemExit("give --gpus N (the first N GPUs) or --devices LIST, not both")
        gpus = len(devices) if devices else args.gpus or gpu_count()
        too_big = [n for n in args.rows.split(",") if need(n, gpus) > gpus]
        if too_big:
            raise SystemExit(f"rows {too_big} need more than the {gpus} GPUs of this host: leave them out of --rows")
        if args.gptfast and args.gptfast_tp > gpus:
            raise SystemExit(f"--gptfast-tp {args.gptfast_tp} needs more than the {gpus} GPUs of this host")
        results = [run(args.rows.split(","), args.out, args.timeout, args.gptfast, args.set, gpus,
                        args.sequential, args.gptfast_tp, devices)]
        (args.out / "gpu_table.json").write_text(json.dumps(results[0], indent=1))
    text = "\n\n".join(table(r) for r in results)
    print(text)
    if args.into:
        try:
            write_section(args.into, text, args.section)
        except LookupError as e:
            raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
