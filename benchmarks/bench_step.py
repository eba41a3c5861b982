"""Pre-training step benchmark: pairs/s, peak memory and where the step time goes.

One ``PretrainTask`` step (forward, backward, AdamW, EMA update of the teacher) on random
inputs, for each configuration and batch size (a "cell"):

- time: the median of ``--steps`` timed steps after one warm-up step, in wall-clock
  seconds; cells run one after the other in the same run, ``--rounds`` times, every other
  round in reverse order, so slow drift of a shared machine touches every cell alike;
- CPU time: the process CPU seconds of the same steps (``time.process_time``). With one
  torch thread it is less sensitive to other processes than the wall clock, though it
  still drifts with what neighbours do to shared caches and memory bandwidth;
- memory: every cell runs in its own child process, forked from a parent that has only
  imported the libraries (no import cost per cell, and no peak carried over from another
  cell). The child resets its resident-set high-water mark (``VmHWM`` in
  ``/proc/self/status``) first; we report the resident set after building the student and
  the teacher, the peak during the steps, the peak above the built model (gradients,
  AdamW state, activations, allocator slack), and the exact bytes of the tensors held
  between steps (weights, teacher, queues, gradients, AdamW state);
- phases: one or more profiled steps, each split by the ``albef/*`` labels of the task
  code plus labels this script puts around backward, the optimizer, the EMA update and
  the teacher's MLM pass (inside ``albef/mlm``); shares are of the whole labelled step;
- model FLOPs of one step (forward and backward, counted by ``FlopCounterMode`` during
  the warm-up step) and the FLOP rate that implies;
- threads (``--thread-check``): one configuration at 1 and 2 torch threads, alternating in
  one process, with OpenMP's default wait policy (and, with ``--passive-check``, in a
  fresh process with ``OMP_WAIT_POLICY=PASSIVE``, which OpenMP reads only at start-up): on
  a loaded machine, threads that spin at barriers while other processes hold the cores
  make a step many times slower.

All cells use ``--threads`` torch threads (1 by default, see ``--thread-check``).

    python benchmarks/bench_step.py --configs tiny sample --batch-sizes 2 8 \\
        --out bench_results/step.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from albef_pl.models import TextConfig, VisionConfig
from albef_pl.momentum import ema_update
from albef_pl.tasks import PretrainTask

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    # name: (vision, text, embed_dim, text length)
    "tiny": (dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2),
             dict(pretrained=None, vocab_size=30522, hidden_size=32, num_hidden_layers=4,
                  num_attention_heads=2, intermediate_size=64, num_text_layers=2), 16, 25),
    # The sizes of conf/pretrain_coco_sample.yaml (MiniLM: 6 layers of width 384).
    "sample": (dict(img_size=128, patch_size=16, embed_dim=192, depth=4, num_heads=3),
               dict(pretrained=None, vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                    num_attention_heads=12, intermediate_size=1536, num_text_layers=3), 256, 25),
    # The paper's: ViT-B/16 at 256 px, BERT-base split 6 text + 6 fusion layers.
    "vit_b16_bert_base": (dict(img_size=256), dict(pretrained=None), 256, 25),
}
# Labels whose times add up to the step (albef/teacher_mlm is inside albef/mlm).
PHASES = ("student_encoders", "teacher_encoders", "hard_negatives", "itm_fusion", "mlm",
          "backward", "optimizer", "ema")
NESTED = ("teacher_mlm",)
MOMENTUM = 0.995


# ---------------------------------------------------------------------------------------------
# The step
def build(name: str, queue_size: int = 1024) -> PretrainTask:
    """A randomly initialised pre-training task of a named size, alpha at the paper's 0.4."""
    vision, text, embed_dim, _ = CONFIGS[name]
    torch.manual_seed(0)
    task = PretrainTask(vision=VisionConfig(**vision), text=TextConfig(**text),
                        embed_dim=embed_dim, queue_size=queue_size, init_weights=False)
    task.alpha.fill_(0.4)
    return task


def batch(task: PretrainTask, b: int, length: int, device: str = "cpu") -> dict:
    """Random normalised images and caption ids of full length (``[CLS]`` first)."""
    s = task.hparams.vision["img_size"]
    g = torch.Generator().manual_seed(b)
    ids = torch.randint(1000, 30000, (b, length), generator=g)
    ids[:, 0] = 101
    data = {"image": torch.randn(b, 3, s, s, generator=g), "input_ids": ids,
            "attention_mask": torch.ones_like(ids)}
    return {k: v.to(device) for k, v in data.items()}


def label_teacher_mlm(task: PretrainTask) -> None:
    """Wrap the teacher's MLM pass in its own profiler label (instance attribute only)."""
    inner = task.teacher.mlm_logits

    def labelled(*args, **kwargs):
        with record_function("albef/teacher_mlm"):
            return inner(*args, **kwargs)

    task.teacher.mlm_logits = labelled


def one_step(task: PretrainTask, opt: torch.optim.Optimizer, data: dict) -> None:
    """Forward (ITC + ITM + MLM), backward, AdamW, EMA: what a training step does."""
    with record_function("albef/step"):
        opt.zero_grad(set_to_none=True)
        out = task.contrastive_and_matching(data["image"], data["input_ids"],
                                            data["attention_mask"])
        loss = out["loss_itc"] + out["loss_itm"] + task.mlm(
            data["input_ids"], data["attention_mask"], out, task.generator)
        with record_function("albef/backward"):
            loss.backward()
        with record_function("albef/optimizer"):
            opt.step()
        with record_function("albef/ema"), torch.no_grad():
            ema_update(task.teacher, task.model, MOMENTUM)


def timed_steps(task, opt, data, steps: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of each of ``steps`` steps."""
    wall, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        one_step(task, opt, data)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def count_flops(task, opt, data) -> int:
    """Model FLOPs of one step (matmuls, attention; forward and backward); runs the step."""
    with FlopCounterMode(display=False) as counter:
        one_step(task, opt, data)
    return counter.get_total_flops()


def phase_shares(task, opt, data, steps: int) -> dict[str, float]:
    """Share of the labelled step's wall time in each phase, over ``steps`` profiled steps."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            one_step(task, opt, data)
    totals = {e.key.split("/", 1)[1]: e.cpu_time_total for e in prof.key_averages()
              if e.key.startswith("albef/")}
    whole = totals["step"]
    shares = {k: totals.get(k, 0.0) / whole for k in PHASES + NESTED}
    shares["other"] = max(0.0, 1.0 - sum(shares[k] for k in PHASES))
    return shares


# ---------------------------------------------------------------------------------------------
# Memory
def _status_mib() -> dict[str, float]:
    """VmRSS and VmHWM of this process in MiB (Linux), or ru_maxrss alone elsewhere."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
        return {k: int(v.split()[0]) / 1024 for k, v in fields.items()}
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"VmRSS": float("nan"), "VmHWM": peak}


def reset_peak() -> bool:
    """Reset the resident-set high-water mark to the current resident set (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def held_tensor_mib(task: PretrainTask, opt: torch.optim.Optimizer) -> dict[str, float]:
    """Exact bytes of what a step keeps alive between steps, by kind."""
    def mib(tensors) -> float:
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20

    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "student_weights": mib(task.model.parameters()),
        "teacher_weights": mib(task.teacher.parameters()),
        "buffers_and_queues": mib(task.buffers()),
        "gradients": mib(p.grad for p in task.parameters() if p.grad is not None),
        "adamw_state": mib(state),
    }


# ---------------------------------------------------------------------------------------------
# Child processes
def child_cell(name: str, b: int, steps: int, profile_steps: int, threads: int) -> dict:
    """Everything about one (configuration, batch size) cell, in a process of its own."""
    torch.set_num_threads(threads)
    was_reset = reset_peak()
    rss_start = _status_mib()["VmRSS"]
    task = build(name)
    label_teacher_mlm(task)
    opt = torch.optim.AdamW(task.parameter_groups(), lr=1e-4)
    data = batch(task, b, CONFIGS[name][3])
    rss_built = _status_mib()["VmRSS"]

    load = [os.getloadavg()[0]]
    flops = count_flops(task, opt, data)  # also the warm-up step (allocates AdamW state)
    wall, cpu = timed_steps(task, opt, data, steps)
    mem = _status_mib()  # before profiling: the profiler's own buffers are not the step's
    shares = phase_shares(task, opt, data, profile_steps)
    load.append(os.getloadavg()[0])
    return {
        "config": name, "batch_size": b, "step_runs_s": wall, "step_cpu_runs_s": cpu,
        "gflop_per_step": flops / 1e9,
        "rss_at_start_mib": rss_start, "rss_after_build_mib": rss_built,
        "peak_rss_mib": mem["VmHWM"], "peak_above_build_mib": mem["VmHWM"] - rss_built,
        "peak_reset_at_start": was_reset,
        "held_tensors_mib": held_tensor_mib(task, opt),
        "trainable_params": sum(p.numel() for p in task.model.parameters() if p.requires_grad),
        "teacher_params": sum(p.numel() for p in task.teacher.parameters()),
        "share": shares, "load_average_1min": load,
    }


def child_threads(name: str, b: int, steps: int) -> dict:
    """The same step at 1 and 2 torch threads, alternating, in this one process."""
    torch.set_num_threads(2)
    task = build(name)
    opt = torch.optim.AdamW(task.parameter_groups(), lr=1e-4)
    data = batch(task, b, CONFIGS[name][3])
    one_step(task, opt, data)  # warm-up
    wall: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[float]] = {1: [], 2: []}
    load = [os.getloadavg()[0]]
    for _ in range(steps):
        for threads in wall:
            torch.set_num_threads(threads)
            w, c = timed_steps(task, opt, data, 1)
            wall[threads] += w
            cpu[threads] += c
    load.append(os.getloadavg()[0])
    return {"config": name, "batch_size": b,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "step_s": {str(k): statistics.median(v) for k, v in wall.items()},
            "step_cpu_s": {str(k): statistics.median(v) for k, v in cpu.items()},
            "step_runs_s": {str(k): v for k, v in wall.items()},
            "load_average_1min": load}


def _call(queue, fn, args) -> None:
    try:
        queue.put(fn(*args))
    except BaseException as err:  # noqa: BLE001 - handed to the parent, which raises it
        queue.put(err)


def in_child(fn, *args) -> dict:
    """``fn(*args)`` in a child process: forked where the platform allows, else spawned.

    The parent must not have run torch operators before (an OpenMP pool does not survive a
    fork); this script's parent only imports.
    """
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    queue = ctx.SimpleQueue()
    proc = ctx.Process(target=_call, args=(queue, fn, args))
    proc.start()
    result = queue.get()
    proc.join()
    if isinstance(result, BaseException):
        raise RuntimeError(f"{fn.__name__}{args} failed in its child process") from result
    return result


def _run_exec(args: list[str], env: dict) -> dict:
    """A fresh interpreter (for settings that OpenMP reads only when it is loaded)."""
    cmd = [sys.executable, __file__, *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Parent
def run_cells(cells: list[tuple[str, int]], rounds: int, steps: int, profile_steps: int,
              threads: int) -> list[dict]:
    """Each cell once per round in its own child; every other round in reverse order."""
    results: dict[tuple[str, int], list[dict]] = {c: [] for c in cells}
    for r in range(rounds):
        for name, b in (cells if r % 2 == 0 else cells[::-1]):
            res = in_child(child_cell, name, b, steps, profile_steps, threads)
            results[(name, b)].append(res)
            print(f"  round {r + 1}: {name} batch {b}: "
                  f"{statistics.median(res['step_runs_s']):.3f} s/step wall, "
                  f"{statistics.median(res['step_cpu_runs_s']):.3f} s CPU", flush=True)
    return [_merge(runs) for runs in results.values()]


def _merge(runs: list[dict]) -> dict:
    """One row per cell: medians over all rounds' steps; memory and shares of round 1."""
    row = dict(runs[0])
    row["step_runs_s"] = [t for run in runs for t in run["step_runs_s"]]
    row["step_cpu_runs_s"] = [t for run in runs for t in run["step_cpu_runs_s"]]
    row["step_s"] = statistics.median(row["step_runs_s"])
    row["step_cpu_s"] = statistics.median(row["step_cpu_runs_s"])
    row["pairs_per_s"] = row["batch_size"] / row["step_s"]
    row["pairs_per_cpu_s"] = row["batch_size"] / row["step_cpu_s"]
    row["achieved_gflop_per_s"] = row["gflop_per_step"] / row["step_s"]
    row["gflop_per_cpu_s"] = row["gflop_per_step"] / row["step_cpu_s"]
    row["teacher_forward_share"] = row["share"]["teacher_encoders"] + row["share"]["teacher_mlm"]
    row["peak_rss_mib_per_round"] = [run["peak_rss_mib"] for run in runs]
    row["load_average_1min"] = [x for run in runs for x in run["load_average_1min"]]
    return row


def thread_check(name: str, b: int, steps: int, passive: bool) -> list[dict]:
    rows = [in_child(child_threads, name, b, steps)]
    if passive:
        env = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "2"}
        rows.append(_run_exec(["--child", "threads", name, str(b),
                               "--thread-check-steps", str(steps)], env))
    return rows


def ratios(rows: list[dict]) -> dict[str, float]:
    """Throughput of each cell over the smallest batch of its configuration (wall and CPU)."""
    out = {}
    for row in rows:
        base = min((r for r in rows if r["config"] == row["config"]),
                   key=lambda r: r["batch_size"])
        if row is not base:
            key = (f"{row['config']} pairs/s, batch {row['batch_size']} / "
                   f"batch {base['batch_size']}")
            out[key + " (wall)"] = row["pairs_per_s"] / base["pairs_per_s"]
            out[key + " (CPU)"] = row["pairs_per_cpu_s"] / base["pairs_per_cpu_s"]
    return out


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (what docs/benchmarks.md shows)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def print_tables(rows: list[dict], threads_rows: list[dict], ratio: dict[str, float]) -> None:
    print("\nstep time (median wall / CPU seconds) and memory (MiB)")
    print(table(
        ["config", "batch", "step s", "CPU s", "pairs/s", "pairs/CPU s", "GFLOP/step",
         "GFLOP/CPU s", "RSS built", "peak RSS", "peak - built", "held tensors"],
        [[r["config"], str(r["batch_size"]), f"{r['step_s']:.3f}", f"{r['step_cpu_s']:.3f}",
          f"{r['pairs_per_s']:.2f}", f"{r['pairs_per_cpu_s']:.2f}", f"{r['gflop_per_step']:.1f}",
          f"{r['gflop_per_cpu_s']:.1f}", f"{r['rss_after_build_mib']:.0f}",
          f"{r['peak_rss_mib']:.0f}", f"{r['peak_above_build_mib']:.0f}",
          f"{sum(r['held_tensors_mib'].values()):.0f}"] for r in rows],
    ))  # fmt: skip
    names = PHASES + NESTED + ("other",)
    print("\nshare of the step's wall time (teacher_mlm is part of mlm)")
    print(table(["config", "batch", *names],
                [[r["config"], str(r["batch_size"]), *(f"{r['share'][n]:.1%}" for n in names)]
                 for r in rows]))
    print()
    for name in dict.fromkeys(r["config"] for r in rows):
        r = next(r for r in rows if r["config"] == name)
        print(f"parameters, {name}: {r['trainable_params']:,} trainable "
              f"+ {r['teacher_params']:,} in the teacher")
    for key, value in ratio.items():
        print(f"{key}: {value:.2f}")
    for t in threads_rows:
        s = t["step_s"]
        print(f"{t['config']} batch {t['batch_size']}, OMP_WAIT_POLICY {t['omp_wait_policy']}: "
              f"1 thread {s['1']:.2f} s, 2 threads {s['2']:.2f} s per step; "
              f"2 threads / 1 thread {s['2'] / s['1']:.2f}")


def parse_cells(args: argparse.Namespace) -> list[tuple[str, int]]:
    if args.cells:
        cells = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cells]
        unknown = {c for c, _ in cells} - set(CONFIGS)
        if unknown:
            raise SystemExit(f"unknown configs {sorted(unknown)}; known: {sorted(CONFIGS)}")
        return cells
    return [(c, b) for c in args.configs for b in args.batch_sizes]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "sample"], choices=list(CONFIGS))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 8])
    p.add_argument("--cells", nargs="+", metavar="CONFIG:BATCH",
                   help="explicit cells, e.g. tiny:2 vit_b16_bert_base:4 (overrides the two above)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per cell and round")
    p.add_argument("--profile-steps", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads in every cell")
    p.add_argument("--thread-check", default="sample:2",
                   help="CONFIG:BATCH timed at 1 and 2 threads; 'none' to skip")
    p.add_argument("--thread-check-steps", type=int, default=3,
                   help="timed steps per thread count")
    p.add_argument("--passive-check", action="store_true",
                   help="also time the thread check with OMP_WAIT_POLICY=PASSIVE (one more "
                        "interpreter start)")
    p.add_argument("--out", type=Path, default=ROOT / "bench_results" / "step.json")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:  # only the OMP_WAIT_POLICY check runs in a fresh interpreter
        print(json.dumps(child_threads(args.child[1], int(args.child[2]),
                                       args.thread_check_steps)))
        return 0

    load = [os.getloadavg()[0]]
    start = time.perf_counter()
    rows = run_cells(parse_cells(args), args.rounds, args.steps, args.profile_steps,
                     args.threads)
    threads_rows = []
    if args.thread_check != "none":
        name, b = args.thread_check.split(":")
        threads_rows = thread_check(name, int(b), args.thread_check_steps, args.passive_check)
    load.append(os.getloadavg()[0])
    ratio = ratios(rows)
    print_tables(rows, threads_rows, ratio)

    report = {
        "settings": {
            "steps": args.steps, "rounds": args.rounds, "threads": args.threads,
            "profile_steps": args.profile_steps, "momentum": MOMENTUM, "queue_size": 1024,
            "alpha": 0.4, "text_length": 25, "thread_check": args.thread_check,
            "thread_check_steps": args.thread_check_steps,
            "time": "median wall-clock and process-CPU seconds of the timed steps of all rounds",
            "memory": "own child process per cell (forked after imports); VmHWM reset at its "
                      "start; peak above the resident set with student and teacher built",
            "shares": "profiler labels albef/*, of the albef/step label's wall time",
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "load_average_1min": load,
                    "seconds": time.perf_counter() - start},
        "rows": rows, "ratios": ratio, "threads": threads_rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
