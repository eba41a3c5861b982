"""GPU pre-training step: bf16-mixed against float32, ViT-B/16 + BERT-base.

For each batch size, one model and one AdamW run both precisions, alternating blocks of
``--steps`` timed steps for ``--rounds`` rounds, in this one process:

- ``32-true``: float32 weights and activations (Lightning's ``precision="32-true"``);
  matmuls in full float32 unless ``--tf32``;
- ``bf16-mixed``: float32 weights, optimizer and queues, the forward under
  ``torch.autocast("cuda", torch.bfloat16)`` and no gradient scaler, which is what
  Lightning's ``precision="bf16-mixed"`` does.

Reports per precision: the median step time (CUDA-synchronised wall clock), pairs per
second, peak allocated and reserved GPU memory (``torch.cuda.max_memory_*``, reset before
each block), the tensors held between steps, and model FLOPs utilisation (MFU): the step's
model FLOPs (forward and backward matmuls and attention, counted once by
``torch.utils.flop_counter.FlopCounterMode``) divided by the step time and by the chip's
dense peak. MFU is given against the bf16 tensor-core peak for both precisions (one common
yardstick) and, for float32, also against the float32 (or TF32) peak.

Peaks in TFLOP/s, dense (no sparsity), from the vendors' data sheets; pass
``--peak-tflops-bf16`` / ``--peak-tflops-fp32`` for another chip or clock:

==========  ======  =====  =====
chip        bf16    tf32   fp32
==========  ======  =====  =====
h100 (SXM)  989.4   494.7  66.9
h200 (SXM)  989.4   494.7  66.9
a100 (SXM)  312.0   156.0  19.5
==========  ======  =====  =====

    python benchmarks/bench_gpu_step.py --chip h100 --out bench_results/gpu_step.json

``--device cpu --configs tiny`` runs the same code on a CPU (a check of the script, not a
benchmark: MFU is then against whatever peak is passed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import CONFIGS, batch, build, count_flops, held_tensor_mib, one_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = {  # dense, no sparsity: bf16 tensor core, tf32 tensor core, fp32 non-tensor
    "h100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "h200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "a100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}
PRECISIONS = ("32-true", "bf16-mixed")


def guess_chip(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((chip for chip in PEAK_TFLOPS if chip in name), None)


def autocast(precision: str, device: str):
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return nullcontext()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def run_block(task, opt, data, precision: str, device: str, steps: int) -> dict:
    """``steps`` timed steps in one precision; peak memory of this block."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        with autocast(precision, device):
            one_step(task, opt, data)
        sync(device)
        times.append(time.perf_counter() - start)
    mem = {}
    if device.startswith("cuda"):
        mem = {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
               "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"times": times, **mem}


def measure_batch(name: str, b: int, args, peaks: dict[str, float]) -> list[dict]:
    """Both precisions at one batch size, alternating, with one model and one optimizer."""
    task = build(name).to(args.device)
    opt = torch.optim.AdamW(task.parameter_groups(), lr=1e-4)  # float32 state for both
    data = batch(task, b, CONFIGS[name][3], args.device)
    flops = count_flops(task, opt, data)  # float32, first step: allocates AdamW state
    for precision in PRECISIONS:  # warm-up: kernels, autocast paths, allocator
        run_block(task, opt, data, precision, args.device, args.warmup)

    blocks: dict[str, list[dict]] = {p: [] for p in PRECISIONS}
    for r in range(args.rounds):
        for precision in (PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]):
            blocks[precision].append(run_block(task, opt, data, precision, args.device,
                                               args.steps))
    held = held_tensor_mib(task, opt)
    fp32_peak = peaks["tf32"] if args.tf32 else peaks["fp32"]
    rows = []
    for precision, runs in blocks.items():
        times = [t for run in runs for t in run["times"]]
        step_s = statistics.median(times)
        achieved = flops / step_s / 1e12
        row = {"config": name, "batch_size": b, "precision": precision, "step_s": step_s,
               "step_runs_s": times, "pairs_per_s": b / step_s,
               "model_tflop_per_step": flops / 1e12, "achieved_tflop_per_s": achieved,
               "mfu_vs_bf16_peak": achieved / peaks["bf16"],
               "held_tensors_gib": sum(held.values()) / 1024}
        if precision == "32-true":
            row["mfu_vs_fp32_peak"] = achieved / fp32_peak
        for key in ("peak_allocated_gib", "peak_reserved_gib"):
            if key in runs[0]:
                row[key] = max(run[key] for run in runs)
        rows.append(row)
    del task, opt, data
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'config':<18}{'batch':>6}{'precision':>12}{'step s':>9}{'pairs/s':>9}"
          f"{'TFLOP/s':>9}{'MFU bf16':>9}{'peak GiB':>10}")
    for r in rows:
        print(f"{r['config']:<18}{r['batch_size']:>6}{r['precision']:>12}{r['step_s']:>9.4f}"
              f"{r['pairs_per_s']:>9.1f}{r['achieved_tflop_per_s']:>9.1f}"
              f"{r['mfu_vs_bf16_peak']:>9.1%}{r.get('peak_allocated_gib', float('nan')):>10.1f}")
    for b in dict.fromkeys(r["batch_size"] for r in rows if "step_s" in r):
        pair = {r["precision"]: r for r in rows if r["batch_size"] == b and "step_s" in r}
        if len(pair) == 2:
            speedup = pair["32-true"]["step_s"] / pair["bf16-mixed"]["step_s"]
            print(f"batch {b}: step time 32-true / bf16-mixed = {speedup:.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="vit_b16_bert_base", choices=list(CONFIGS))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 64])
    p.add_argument("--steps", type=int, default=10, help="timed steps per block")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per precision")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--chip", choices=list(PEAK_TFLOPS),
                   help="peak table row (default: guessed from the device name)")
    p.add_argument("--peak-tflops-bf16", type=float, help="dense bf16 peak, overrides --chip")
    p.add_argument("--peak-tflops-fp32", type=float,
                   help="dense float32 peak (TF32 peak with --tf32), overrides --chip")
    p.add_argument("--tf32", action="store_true", help="let float32 matmuls use TF32")
    p.add_argument("--out", type=Path, default=ROOT / "bench_results" / "gpu_step.json")
    args = p.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing measured", file=sys.stderr)
        return 2
    chip = args.chip or guess_chip(args.device)
    peaks = dict(PEAK_TFLOPS.get(chip, {"bf16": float("nan"), "tf32": float("nan"),
                                        "fp32": float("nan")}))
    if args.peak_tflops_bf16:
        peaks["bf16"] = args.peak_tflops_bf16
    if args.peak_tflops_fp32:
        peaks["tf32" if args.tf32 else "fp32"] = args.peak_tflops_fp32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32

    rows = []
    for b in args.batch_sizes:
        try:
            rows += measure_batch(args.config, b, args, peaks)
        except torch.cuda.OutOfMemoryError as err:
            print(f"batch {b}: out of memory ({err})", file=sys.stderr)
            rows.append({"config": args.config, "batch_size": b, "error": "out of memory"})
            torch.cuda.empty_cache()
    print_table([r for r in rows if "step_s" in r])

    device_name = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
                   else platform.processor() or "cpu")
    report = {
        "settings": {"config": args.config, "steps": args.steps, "warmup": args.warmup,
                     "rounds": args.rounds, "tf32": args.tf32, "chip": chip,
                     "peak_tflops": peaks,
                     "time": "median CUDA-synchronised wall clock of all timed steps",
                     "flops": "FlopCounterMode on one float32 step, forward + backward"},
        "machine": {"device": device_name, "torch": torch.__version__,
                    "cuda": torch.version.cuda, "platform": platform.platform(),
                    "load_average_1min": os.getloadavg()[0]},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
