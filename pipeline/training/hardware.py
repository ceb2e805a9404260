"""Peak FLOP/s per accelerator, for model FLOPs utilisation (MFU = achieved FLOP/s ÷ peak).

Dense (no sparsity) tensor-core peaks from the vendors' data sheets, per precision class: `bf16`
(bf16/fp16 autocast or true half) and `tf32` (fp32 weights, where matmuls run in TF32). A device not
in the table gives no MFU unless `trainer.peak_tflops` names its peak.
"""
from __future__ import annotations

import platform

import torch

# name fragment (as torch.cuda.get_device_name reports it, lower case) -> {precision class: TFLOP/s}
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "h200": {"bf16": 989.0, "tf32": 494.5},
    "h100": {"bf16": 989.0, "tf32": 494.5},
    "a100": {"bf16": 312.0, "tf32": 156.0},
    "l4": {"bf16": 121.0, "tf32": 60.0},
    "v100": {"bf16": 125.0, "tf32": 15.7},  # fp16 tensor cores; V100 has no bf16/tf32
}


def precision_class(precision: str) -> str:
    return "bf16" if str(precision).startswith(("bf16", "16")) else "tf32"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return device.type


def describe_device(device: torch.device | str, processes: int = 1) -> str:
    """What a stage trained on, for the report: "cpu (x86_64, 2 threads)", "NVIDIA H200", "4 x NVIDIA H200"."""
    device = torch.device(device)
    if device.type == "cpu":
        name = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    else:
        name = device_name(device)
    return f"{processes} x {name}" if processes > 1 else name


def peak_flops(device: torch.device | str, precision: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one `device` at `precision`, or None when unknown (CPU, unlisted GPU)."""
    if override_tflops:
        return float(override_tflops) * 1e12
    name = device_name(device).lower()
    for fragment, peaks in PEAK_TFLOPS.items():
        if fragment in name:
            return peaks[precision_class(precision)] * 1e12
    return None
