"""The prepared GPU check: training img/s and MFU of the CIFAR-10 DDPM recipe, per speed setting.

The real ``genexp.commands.train.train`` runs ``experiment=ddpm_cifar10`` (the paper's 35.7M-parameter UNet,
batch 128, Adam 2e-4 with warm-up, gradient clipping at 1, EMA 0.9999) on CIFAR-shaped synthetic data
(``dataset=synthetic``, 3x32x32: CIFAR-10 cannot be downloaded offline, and the speed does not depend
on the pixels), with no logger, validation, test, checkpoints or sample grids, for ``--warmup`` +
``--steps`` optimizer steps, once per variant, each in a fresh process:

- ``fp32``: ``performance.precision=32-true`` (float32 matmuls at ``highest``: no TF32);
- ``bf16``: ``performance.precision=bf16-mixed``;
- ``bf16_compile_cl``: bf16-mixed + ``performance.compile=true performance.channels_last=true``;
- ``bf16_compile_cl_dd``: the same + ``performance.device_data=true`` (batches sliced on the GPU).

The optimizer keeps ``performance.optimizer_impl=auto`` (fused Adam on CUDA) throughout.

img/s counts the steps after the warm-up (which holds the compilation), each from batch end to batch
end with a CUDA synchronise there (data, forward, backward, optimizer, EMA). Peak memory is
``torch.cuda.max_memory_allocated`` over the whole run. Model FLOPs are measured, not assumed: a
``torch.utils.flop_counter.FlopCounterMode`` counts one forward and one forward+backward of the
family's loss on the real net (convolutions, matmuls, attention; elementwise work is not counted,
as MFU conventionally does not), and the table prints both and their ratio. MFU = training
FLOP/image x img/s / the card's dense bf16 peak (looked up by ``torch.cuda.get_device_name`` or set
with ``--peak-tflops``), for every variant, fp32 included (so it shows what fp32 leaves unused).

    python scripts/bench_gpu.py --json bench_gpu.json             # on a CUDA machine, ~5-8 minutes
    python scripts/bench_gpu.py --smoke                           # CPU, toy sizes: proves the script
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import QUIET_RUN, Table, child_env, command_line, has_config_group, write_json

VARIANTS = {
    "fp32": ["performance.precision=32-true"],
    "bf16": ["performance.precision=bf16-mixed"],
    "bf16_compile_cl": [
        "performance.precision=bf16-mixed",
        "performance.compile=true",
        "performance.channels_last=true",
    ],
    "bf16_compile_cl_dd": [
        "performance.precision=bf16-mixed",
        "performance.compile=true",
        "performance.channels_last=true",
        "performance.device_data=true",
    ],
}
# without the performance/ group (an older tree): precision through the Trainer, no compile variants
FALLBACK = {"fp32": ["trainer.precision=32-true"], "bf16": ["trainer.precision=bf16-mixed"]}

# dense bf16 tensor-core peak, TFLOP/s (vendor datasheets, without sparsity); first match wins
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("RTX 4090", 165.2),
]

TARGET_IMG_PER_SEC = 3000  # one H100; the DDPM paper's TPU v3-8 trained at ~2.7k img/s
TARGET_MFU = 0.35


def recipe(args) -> list[str]:
    """The composed run of every variant (the smoke run shrinks the net and the data)."""
    overrides = [
        "experiment=ddpm_cifar10",
        "dataset=synthetic",
        "dataset.image_size=32",
        "dataset.channels=3",
        f"dataset.num_images={args.num_images}",
        f"accelerator={'cpu' if args.smoke else 'gpu'}",
        *QUIET_RUN,
        f"data.batch_size={args.batch_size}",
        f"trainer.max_steps={args.warmup + args.steps}",
    ]
    if args.smoke:
        overrides += [
            "model.net.base_channels=8",
            "model.net.channel_mults=[1,2]",
            "model.net.num_res_blocks=1",
            "model.net.num_groups=4",
            "data.num_workers=0",
        ]
    return overrides


def count_flops(args) -> dict:
    """FLOPs per image of one forward and of one forward+backward of the family's loss."""
    import torch
    from benchlib import compose
    from torch.utils.flop_counter import FlopCounterMode

    from genexp.build import build_model

    device = torch.device("cpu" if args.smoke else "cuda")
    cfg = compose([*recipe(args), "paths.output_dir=unused"])
    model = build_model(cfg).to(device).train()
    x = torch.rand(args.flop_batch, 3, 32, 32, device=device)  # images in [0, 1], as the data yield
    with FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            model.loss(x)
    with FlopCounterMode(display=False) as both:
        model.loss(x).loss.backward()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the variants run in their own processes
    return {
        "forward_flops_per_img": forward.get_total_flops() / args.flop_batch,
        "train_flops_per_img": both.get_total_flops() / args.flop_batch,
        "parameters": params,
    }


def peak_flops(args, device_name: str) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None


def worker(args) -> None:
    """One variant in this process; writes its numbers to ``--out``."""
    import torch
    from benchlib import PeakMemory, compose, device_label, quiet, torch_label, train_timed

    quiet()
    device = torch.device("cpu" if args.smoke else "cuda")
    overrides = [*recipe(args), *args.variant_overrides, f"paths.output_dir={Path(args.out).parent / 'run'}"]
    start = time.perf_counter()
    with PeakMemory(device) as memory:
        timer, metrics = train_timed(compose(overrides))
    result = {
        "img_per_sec": timer.img_per_sec_after(args.warmup),
        "ms_per_step": 1000 * sum(timer.steps[args.warmup :]) / max(1, len(timer.steps) - args.warmup),
        "warmup_s": sum(timer.steps[: args.warmup]),
        "timed_steps": len(timer.steps) - args.warmup,
        "peak_mib": memory.mib,
        "memory": memory.kind,
        "parameters": metrics["num_parameters"],
        "wall_s": time.perf_counter() - start,
        "device": device_label(device),
        "torch": torch_label(),
    }
    Path(args.out).write_text(json.dumps(result))


def run_variant(args, name: str, overrides: list[str], tmp: Path, timeout: float) -> dict:
    out = tmp / name / "result.json"
    out.parent.mkdir(parents=True)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        f"--out={out}",
        f"--batch-size={args.batch_size}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--num-images={args.num_images}",
        *(["--smoke"] if args.smoke else []),
        "--",
        *overrides,
    ]
    try:
        done = subprocess.run(
            command, cwd=tmp, env=child_env(), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0 or not out.is_file():
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        return {"error": (lines[-1] if lines else f"exit code {done.returncode}")[:300]}
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated of {', '.join(VARIANTS)}"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="per step (default 128, the paper's; smoke 4)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per variant (default 150; smoke 2)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first, compilation included (20; 1)"
    )
    parser.add_argument(
        "--num-images",
        type=int,
        default=None,
        help="synthetic images (default 40960: 256 steps an epoch; smoke 64)",
    )
    parser.add_argument("--flop-batch", type=int, default=4, help="images in the FLOP-counting pass")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="bf16 dense peak of the card (overrides the table)"
    )
    parser.add_argument(
        "--budget", type=float, default=480, help="seconds for all variants; later ones are skipped"
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds per variant at most")
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, toy UNet and data: exercises every path here"
    )
    parser.add_argument("--json", default=None, help="also write the rows to this file (after every variant)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("variant_overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = (4, 2, 1, 64) if args.smoke else (128, 150, 20, 40960)
    for key, value in zip(("batch_size", "steps", "warmup", "num_images"), defaults):
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.worker:
        return worker(args)

    start = time.perf_counter()
    import torch

    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here; --smoke runs the script on the CPU at toy sizes")
    device_name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0)
    peak = peak_flops(args, device_name)
    variants = VARIANTS if has_config_group("performance") else FALLBACK
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    flops = count_flops(args)
    print(
        f"model FLOPs per image: forward {flops['forward_flops_per_img'] / 1e9:.3f} GFLOP, "
        f"forward+backward {flops['train_flops_per_img'] / 1e9:.3f} GFLOP "
        f"(ratio {flops['train_flops_per_img'] / flops['forward_flops_per_img']:.2f}; FlopCounterMode, "
        f"batch {args.flop_batch}) | {flops['parameters'] / 1e6:.2f}M parameters"
    )
    print(
        f"peak: {'%.1f TFLOP/s bf16 dense' % (peak / 1e12) if peak else 'unknown (pass --peak-tflops)'} "
        f"({device_name})",
        flush=True,
    )
    table = Table(
        [
            ("variant", "variant"),
            ("batch", "batch"),
            ("img_per_sec", "img/s"),
            ("ms_per_step", "ms/step"),
            ("tflops", "model TFLOP/s", "{:.3g}"),
            ("mfu", "MFU", "{:.1%}"),
            ("peak_mib", "peak MiB"),
            ("warmup_s", "warm-up s", "{:.1f}"),
            ("device", "device"),
            ("torch", "torch"),
            ("note", "note"),
        ]
    )
    payload = {
        "flops": flops,
        "peak_flops": peak,
        "device_name": device_name,
        "targets": {"img_per_sec": TARGET_IMG_PER_SEC, "mfu": TARGET_MFU},
        "rows": table.rows,
        "args": vars(args),
        "command": command_line(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            left = args.budget - (time.perf_counter() - start)
            row = {"variant": name, "batch": args.batch_size, "device": device_name}
            if name not in variants:
                row["note"] = "skipped: this config tree has no performance/ group (compile, channels_last)"
            elif left < 30:
                row["note"] = f"skipped: --budget {args.budget:.0f} s spent"
            else:
                r = run_variant(args, name, variants[name], Path(tmp), min(args.timeout, left))
                row.update(r)
                if "error" in r:
                    row["note"] = f"failed: {r['error']}"
                else:
                    row["tflops"] = flops["train_flops_per_img"] * r["img_per_sec"] / 1e12
                    row["mfu"] = row["tflops"] * 1e12 / peak if peak else None
            table.add(row)
            write_json(args.json, payload, say=False)  # partial results survive a kill
    done = [r for r in table.rows if "img_per_sec" in r]
    if done and not args.smoke:
        best = max(done, key=lambda r: r["img_per_sec"])
        mfu = best.get("mfu")
        print(
            f"best: {best['variant']} {best['img_per_sec']:.0f} img/s (target >= {TARGET_IMG_PER_SEC} on an "
            f"H100), MFU {'n/a' if mfu is None else f'{mfu:.1%}'} (target >= {TARGET_MFU:.0%})"
        )
    print(
        f"{args.steps} timed steps after {args.warmup} warm-up per variant, {time.perf_counter() - start:.0f} s"
    )
    print(f"command: {command_line()}")
    write_json(args.json, payload)


if __name__ == "__main__":
    main()
