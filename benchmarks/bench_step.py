"""Pre-training step benchmark: pairs/s, peak memory and where the step time goes.

Runs one ``PretrainTask`` step (forward, backward, AdamW, EMA update) on random inputs for
each configuration and batch size, all in one process so that the comparisons share the
machine's state. The share of step time per phase comes from the ``albef/*`` profiler
labels in the task code (student encoders, teacher encoders, hard negatives, ITM fusion,
MLM with its teacher pass).

    python benchmarks/bench_step.py --configs tiny sample --batch-sizes 2 8 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from albef_pl.models import TextConfig, VisionConfig
from albef_pl.momentum import ema_update
from albef_pl.tasks import PretrainTask

CONFIGS = {
    # name: (vision, text, embed_dim, text length)
    "tiny": (dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2),
             dict(pretrained=None, vocab_size=30522, hidden_size=32, num_hidden_layers=4,
                  num_attention_heads=2, intermediate_size=64, num_text_layers=2), 16, 25),
    "sample": (dict(img_size=128, patch_size=16, embed_dim=192, depth=4, num_heads=3),
               dict(pretrained=None, vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                    num_attention_heads=12, intermediate_size=1536, num_text_layers=3), 256, 25),
    "vit_b16_bert_base": (dict(img_size=256), dict(pretrained=None), 256, 25),
}
PHASES = ("albef/student_encoders", "albef/teacher_encoders", "albef/hard_negatives",
          "albef/itm_fusion", "albef/mlm")


def build(name: str, queue_size: int = 1024) -> PretrainTask:
    vision, text, embed_dim, _ = CONFIGS[name]
    torch.manual_seed(0)
    return PretrainTask(vision=VisionConfig(**vision), text=TextConfig(**text),
                        embed_dim=embed_dim, queue_size=queue_size, init_weights=False)


def batch(task: PretrainTask, b: int, length: int) -> dict[str, torch.Tensor]:
    s = task.hparams.vision["img_size"]
    ids = torch.randint(1000, 30000, (b, length))
    ids[:, 0] = 101
    return {"image": torch.randn(b, 3, s, s), "input_ids": ids,
            "attention_mask": torch.ones_like(ids)}


def one_step(task, opt, data) -> None:
    opt.zero_grad(set_to_none=True)
    out = task.contrastive_and_matching(data["image"], data["input_ids"],
                                        data["attention_mask"])
    loss = out["loss_itc"] + out["loss_itm"] + task.mlm(
        data["input_ids"], data["attention_mask"], out, task.generator)
    loss.backward()
    opt.step()
    ema_update(task.teacher, task.model, 0.995)


def measure(name: str, b: int, steps: int) -> dict:
    task = build(name)
    task.alpha.fill_(0.4)
    opt = torch.optim.AdamW(task.parameter_groups(), lr=1e-4)
    data = batch(task, b, CONFIGS[name][3])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    one_step(task, opt, data)  # warm-up (allocates optimizer state)
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step(task, opt, data)
    step_s = (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        one_step(task, opt, data)
    totals = {e.key: e.cpu_time_total for e in prof.key_averages() if e.key in PHASES}
    whole = sum(e.self_cpu_time_total for e in prof.key_averages())
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainable = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
    return {
        "config": name, "batch_size": b, "step_s": step_s, "pairs_per_s": b / step_s,
        "peak_rss_mib": rss1 / 1024, "rss_growth_mib": (rss1 - rss0) / 1024,
        "trainable_params": trainable,
        "share": {k.split("/")[1]: totals.get(k, 0) / whole for k in PHASES},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "sample", "vit_b16_bert_base"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 8])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench_results/step.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    print(f"{'config':<20}{'batch':>6}{'step s':>9}{'pairs/s':>9}{'peak MiB':>10}"
          f"{'student':>9}{'teacher':>9}{'hardneg':>9}{'itm':>7}{'mlm':>7}")
    for name in args.configs:
        for b in args.batch_sizes:
            r = measure(name, b, args.steps)
            rows.append(r)
            sh = r["share"]
            print(f"{name:<20}{b:>6}{r['step_s']:>9.3f}{r['pairs_per_s']:>9.2f}"
                  f"{r['peak_rss_mib']:>10.0f}{sh['student_encoders']:>9.1%}"
                  f"{sh['teacher_encoders']:>9.1%}{sh['hard_negatives']:>9.1%}"
                  f"{sh['itm_fusion']:>7.1%}{sh['mlm']:>7.1%}", flush=True)
    for name in args.configs:
        print(f"trainable parameters, {name}: "
              f"{next(r['trainable_params'] for r in rows if r['config'] == name):,}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.platform(), "processor": platform.processor(),
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
