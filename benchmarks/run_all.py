"""Run every benchmark, write one JSON per benchmark into ``--out`` and print the tables.

- ``step.json``: ``--quick`` times tiny and sample at batch 2 and 8 in one round; the full
  run adds batch 32, ViT-B/16 + BERT-base at batch 2 and 4, a second round and the
  ``OMP_WAIT_POLICY=PASSIVE`` thread check;
- ``retrieval_eval.json``: 30 and 60 images, one repeat (full: 30, 60 and 120, two);
- ``data.json``: three interleaved repeats of each decode, six loader batches (full: twelve);
- ``gpu_step.json``: bf16-mixed against float32 on ViT-B/16 + BERT-base, only where CUDA is
  available (skipped, and said so, elsewhere).

``machine.json`` records the machine (CPUs, CPU model, memory, torch, load average before
and after each benchmark) and ``summary.json`` the headline ratios, which are printed last.

The benchmarks run in this one interpreter, in this order: the step benchmark first (it
forks a child per cell, which needs a parent that has not run torch operators yet), then
retrieval evaluation (which starts its own processes), data, and the GPU step.

    python benchmarks/run_all.py --quick --out bench_results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

STEP_QUICK = ["--cells", "tiny:2", "tiny:8", "sample:2", "sample:8", "--rounds", "1",
              "--steps", "3", "--thread-check", "sample:2", "--thread-check-steps", "2"]
STEP_FULL = ["--cells", "tiny:2", "tiny:8", "tiny:32", "sample:2", "sample:8", "sample:32",
             "vit_b16_bert_base:2", "vit_b16_bert_base:4", "--rounds", "2", "--steps", "3",
             "--thread-check", "sample:2", "--passive-check"]


def plan(quick: bool, out: Path) -> list[tuple[str, str, list[str]]]:
    """(name, module, argv) of each benchmark, in the order they must run."""
    return [
        ("step", "bench_step", [*(STEP_QUICK if quick else STEP_FULL),
                                "--out", str(out / "step.json")]),
        # NOTE: exhaustive ITM over 120 images x 600 captions alone takes about eight CPU
        # minutes here, so the quick variant stops at 60 images (growth is visible from 30).
        ("retrieval_eval", "bench_retrieval_eval",
         ["--sizes", *(["30", "60"] if quick else ["30", "60", "120"]),
          "--repeats", "1" if quick else "2", "--out", str(out / "retrieval_eval.json")]),
        # Three interleaved repeats even when quick: one pass of each decode is too noisy here.
        ("data", "bench_data", [*(["--repeats", "3", "--loader-batches", "6"] if quick else []),
                                "--out", str(out / "data.json")]),
        # Quick: Grad-CAM of the sample model (the paper's at 384 px takes ~1.5 CPU s each).
        ("grounding_boxes", "bench_grounding_boxes",
         [*(["--small", "--repeats", "3"] if quick else []),
          "--out", str(out / "grounding_boxes.json")]),
        ("gpu_step", "bench_gpu_step", ["--out", str(out / "gpu_step.json")]),
    ]


def machine_info() -> dict:
    """What the numbers ran on, read from /proc where it exists."""
    def first(path: str, key: str) -> str | None:
        try:
            with open(path) as f:
                return next((line.split(":", 1)[1].strip() for line in f
                             if line.startswith(key)), None)
        except OSError:
            return None

    mem_kib = first("/proc/meminfo", "MemTotal")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                capture_output=True, text=True).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "cpus": os.cpu_count(),
        "cpu_model": first("/proc/cpuinfo", "model name") or platform.processor(),
        "memory_gib": round(int(mem_kib.split()[0]) / 2**20, 1) if mem_kib else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": commit,
    }


def run_one(name: str, module: str, argv: list[str]) -> dict:
    """Import a benchmark and call its ``main(argv)``; never let one failure stop the rest."""
    if name == "gpu_step" and not torch.cuda.is_available():
        print("no CUDA device: skipped (run benchmarks/bench_gpu_step.py on a GPU machine)")
        return {"status": "skipped", "reason": "no CUDA device"}
    load, start = [os.getloadavg()[0]], time.perf_counter()
    threads = torch.get_num_threads()
    try:
        status = __import__(module).main(argv)
        status = "ok" if status in (0, None) else f"exit {status}"
    except ModuleNotFoundError as err:
        status = f"missing: {err}"
    except Exception:  # noqa: BLE001 - reported, then the next benchmark runs
        traceback.print_exc()
        status = "failed"
    torch.set_num_threads(threads)  # a benchmark's thread setting must not leak into the next
    load.append(os.getloadavg()[0])
    return {"status": status, "seconds": time.perf_counter() - start, "load_average_1min": load}


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def headlines(out: Path) -> dict[str, float]:
    """The ratios docs/benchmarks.md quotes, from the JSON files just written."""
    h: dict[str, float] = {}
    step = _read(out / "step.json")
    if step:
        for r in step["rows"]:
            h[f"step {r['config']} b{r['batch_size']}: teacher forward share"] = (
                r["teacher_forward_share"])
            h[f"step {r['config']} b{r['batch_size']}: backward + optimizer + EMA share"] = (
                r["share"]["backward"] + r["share"]["optimizer"] + r["share"]["ema"])
        h.update({f"step {k}": v for k, v in step["ratios"].items()})
        for t in step["threads"]:
            h[f"step {t['config']} b{t['batch_size']}: 2 threads / 1 thread step time, "
              f"OMP_WAIT_POLICY {t['omp_wait_policy']}"] = t["step_s"]["2"] / t["step_s"]["1"]
    data = _read(out / "data.json")
    if data:
        rows = data["decode_augment"]
        for full, reduced in zip(rows[::2], rows[1::2]):
            h[f"data {full['transform']}, {full['source'].split(',')[0]}: reduced / full "
              f"decode images/s"] = reduced["images_per_s"] / full["images_per_s"]
        base = data["loader"][0]["images_per_s"]
        for r in data["loader"][1:]:
            h[f"data loader {r['num_workers']} workers / 0 workers"] = r["images_per_s"] / base
    ret = _read(out / "retrieval_eval.json")
    if ret:
        h.update(retrieval_headlines(ret["rows"]))
    gpu = _read(out / "gpu_step.json")
    if gpu:
        for b in dict.fromkeys(r["batch_size"] for r in gpu["rows"] if "step_s" in r):
            pair = {r["precision"]: r for r in gpu["rows"]
                    if r["batch_size"] == b and "step_s" in r}
            if len(pair) == 2:
                h[f"gpu b{b}: step time 32-true / bf16-mixed"] = (
                    pair["32-true"]["step_s"] / pair["bf16-mixed"]["step_s"])
    return h


def retrieval_headlines(rows: list[dict]) -> dict[str, float]:
    """Exhaustive over two-stage at each size, and each method's growth from the smallest."""
    h = {}
    by = {(r["mode"], r["images"]): r for r in rows}
    sizes = sorted({r["images"] for r in rows})
    for n in sizes:
        if ("two_stage", n) in by and ("exhaustive", n) in by:
            ex, ts = by[("exhaustive", n)], by[("two_stage", n)]
            key = "rank_cpu_seconds" if "rank_cpu_seconds" in ex else "rank_seconds"
            h[f"retrieval {n} images: exhaustive / two-stage ranking time"] = ex[key] / ts[key]
            h[f"retrieval {n} images: exhaustive / two-stage fusion pairs"] = (
                ex["fusion_pairs"] / ts["fusion_pairs"])
    for mode in ("two_stage", "exhaustive"):
        small, large = by.get((mode, sizes[0])), by.get((mode, sizes[-1]))
        if small and large and small is not large:
            key = "rank_cpu_seconds" if "rank_cpu_seconds" in small else "rank_seconds"
            h[f"retrieval {mode}: ranking time at {sizes[-1]} / {sizes[0]} images"] = (
                large[key] / small[key])
    return h


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the under-ten-minutes variant")
    p.add_argument("--out", type=Path, default=Path("bench_results"))
    p.add_argument("--only", nargs="+", choices=["step", "retrieval_eval", "data", "gpu_step"],
                   help="run only these benchmarks")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    machine = machine_info()
    machine["load_average_1min_start"] = os.getloadavg()[0]
    machine["variant"] = "quick" if args.quick else "full"
    print(f"{machine['cpus']} CPUs ({machine['cpu_model']}), {machine['memory_gib']} GiB, "
          f"torch {machine['torch']}, load average {machine['load_average_1min_start']:.1f}")
    start, runs = time.perf_counter(), {}
    for name, module, bench_argv in plan(args.quick, args.out):
        if args.only and name not in args.only:
            continue
        print(f"\n===== {name}: {module}.py {' '.join(bench_argv)}", flush=True)
        runs[name] = run_one(name, module, bench_argv)
        print(f"----- {name}: {runs[name]['status']}"
              + (f" in {runs[name]['seconds']:.0f} s" if "seconds" in runs[name] else ""))
    machine["benchmarks"] = runs
    machine["seconds"] = time.perf_counter() - start
    machine["cpu_seconds"] = sum(  # this process and every child it waited for
        r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                          resource.getrusage(resource.RUSAGE_CHILDREN)))
    machine["load_average_1min_end"] = os.getloadavg()[0]
    (args.out / "machine.json").write_text(json.dumps(machine, indent=1) + "\n")

    ratios = headlines(args.out)
    (args.out / "summary.json").write_text(json.dumps(ratios, indent=1) + "\n")
    print(f"\n===== headline ratios ({machine['seconds'] / 60:.1f} min wall, "
          f"{machine['cpu_seconds'] / 60:.1f} min CPU in all; load average "
          f"{machine['load_average_1min_start']:.1f} -> {machine['load_average_1min_end']:.1f})")
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}")
    failed = [n for n, r in runs.items() if r["status"] not in ("ok", "skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
