"""GPU check: every method's ``gpu`` preset for a few iterations, and an SD-size UNet update step at bf16.

Two parts, written to ``benchmarks/results/gpu.json``:

1. **Methods.** For each method, ``rlvg train METHOD --preset gpu`` on its default shipped model, for
   ``--iterations`` outer steps on CUDA (evaluation off): seconds per iteration and peak GPU memory.
   The shipped models are tiny, so this checks that every preset runs on a GPU and what one iteration
   costs there, not how a real checkpoint trains.
2. **An SD-size update step.** A ``UNet2DConditionModel`` with Stable Diffusion 1.x's configuration and
   random weights, forward and backward at bf16 autocast on a batch of 64x64 latents, plus an AdamW step.
   FLOPs are counted by ``torch.utils.flop_counter``; utilisation is achieved FLOP/s over the GPU's dense
   bf16 peak (a table of known GPUs; unknown ones report none). Target: 40% or more.

    make gpu-check                     # python -m benchmarks.gpu_check
    python -m benchmarks.gpu_check --iterations 3 --batch 8

Without CUDA the check says so and exits with status 0 without writing results (CI has no GPU). The
``--device cpu --tiny`` options run the same code on a CPU with a small UNet: the tests use them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, machine_description, write_results

PEAK_BF16_TFLOPS: dict[str, float] = {
    # Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets.
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
}
SD_UNET = dict(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
               block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
"""Stable Diffusion 1.x's UNet (860M parameters)."""
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=32, attention_head_dim=4,
                 block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a known GPU, matched on its name (longest key first)."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_TFLOPS[key]
    return None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def method_iterations(device: str, iterations: int, methods: list[str] | None = None, preset: str = "gpu"
                      ) -> dict[str, dict]:
    """Seconds per iteration and peak memory of each method's ``preset`` on its default model."""
    from benchmarks.method_table import _settings
    from reference_impls.algorithms import METHODS
    from reference_impls.models import load_policy
    from reference_impls.rewards import get_reward
    from reference_impls.training import build_config, train

    rows: dict[str, dict] = {}
    for name in methods or list(METHODS):
        cls = METHODS[name]
        settings = {**_settings(name, quick=False), "preset": preset, "device": device, "steps": iterations,
                    "eval_every": 0, "eval_prompts": 1, "checkpoint_every": iterations, "threads": 0}
        config = build_config(cls.config_class, cls.presets, settings, cls.video_presets)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory() as tmp:
            method = cls(policy=load_policy(config.model, device=device), reward=get_reward(config.reward), config=config)
            records = train(method, Path(tmp) / "run", progress=False)
        walls = [r["wall_s"] for r in records if r["step"] > 0]
        per_step = [b - a for a, b in zip([0.0, *walls[:-1]], walls)]
        rows[name] = {
            "model": config.model, "reward": config.reward, "preset": preset, "iterations": iterations,
            "seconds_per_iteration": statistics.median(per_step[1:] or per_step),
            "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30) if device.startswith("cuda") else None,
        }
        print(f"{name}: {rows[name]['seconds_per_iteration']:.2f} s per iteration", flush=True)
    return rows


def unet_update_step(device: str, batch: int, repeats: int, tiny: bool) -> dict:
    """One forward + backward + AdamW step of a random SD-size UNet at bf16 autocast: time, FLOPs, utilisation."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    config = TINY_UNET if tiny else SD_UNET
    unet = UNet2DConditionModel(**config).to(device)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-6)
    size = config["sample_size"]
    x = torch.randn(batch, 4, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    text = torch.randn(batch, 77, config["cross_attention_dim"], device=device)
    dtype = torch.bfloat16
    dev = torch.device(device)

    def step() -> None:
        with torch.autocast(device_type=dev.type, dtype=dtype):
            out = unet(x, t, encoder_hidden_states=text).sample
        out.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(2):
        step()
    _synchronize(dev)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        _synchronize(dev)
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = peak_tflops(name) if dev.type == "cuda" else None
    achieved = flops / seconds / 1e12
    return {
        "unet": "tiny" if tiny else "stable-diffusion-1.x", "parameters_m": sum(p.numel() for p in unet.parameters()) / 1e6,
        "batch": batch, "latent_size": size, "dtype": "bf16 autocast", "seconds": seconds, "tflop_per_step": flops / 1e12,
        "achieved_tflops": achieved, "device": name, "peak_bf16_tflops": peak,
        "utilisation": None if peak is None else achieved / peak,
        "peak_memory_gib": (torch.cuda.max_memory_allocated(dev) / 2**30) if dev.type == "cuda" else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny, for tests)")
    parser.add_argument("--iterations", type=int, default=3, help="outer iterations per method")
    parser.add_argument("--methods", nargs="*", default=None, help="default: every method")
    parser.add_argument("--batch", type=int, default=8, help="UNet update batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed UNet update steps")
    parser.add_argument("--tiny", action="store_true", help="a small UNet instead of SD's (CPU tests)")
    parser.add_argument("--preset", default="gpu", help="the methods' preset (gpu; smoke for CPU tests)")
    parser.add_argument("--out", default="gpu", help="results file name (without .json)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the results file goes")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; nothing measured (CI has no GPU). Run it on a GPU machine.")
        return 0
    result = {
        "what": "every method's gpu preset for a few iterations, and an SD-size UNet update step at bf16",
        "machine": machine_description(),
        "command": "python -m benchmarks.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:]),
        "unet_update": unet_update_step(args.device, args.batch, args.repeats, args.tiny),
        "methods": method_iterations(args.device, args.iterations, args.methods, args.preset),
    }
    update = result["unet_update"]
    print(f"UNet update: {update['seconds']:.3f} s, {update['achieved_tflops']:.1f} TFLOP/s"
          + (f", {100 * update['utilisation']:.0f}% of bf16 peak" if update["utilisation"] else ""))
    write_results(args.out, result, args.results_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
