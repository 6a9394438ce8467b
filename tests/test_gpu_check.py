"""make gpu-check: its code runs on a CPU with a small UNet (CI has no GPU), and it knows GPU peaks."""

from __future__ import annotations

from pathlib import Path


def test_gpu_check_runs_its_code_on_a_cpu(tmp_path: Path) -> None:
    """CI has no GPU: run the check's code path with a small UNet and a smoke preset, and read its report."""
    import json

    from benchmarks.gpu_check import main as gpu_check
    from benchmarks.gpu_check import peak_tflops

    assert gpu_check(["--device", "cpu", "--tiny", "--preset", "smoke", "--iterations", "2", "--methods", "flow-grpo",
                      "--batch", "2", "--repeats", "1", "--results-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["unet_update"]["tflop_per_step"] > 0 and report["unet_update"]["seconds"] > 0
    assert report["methods"]["flow-grpo"]["seconds_per_iteration"] > 0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("Some Future GPU") is None
