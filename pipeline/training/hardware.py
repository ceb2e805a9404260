"""Peak FLOP/s per accelerator, for model FLOPs utilisation (MFU = achieved FLOP/s ÷ peak).

The peak is Lightning's device table (lightning.fabric.utilities.throughput.get_available_flops: CUDA GPUs by the
name torch reports, per dtype; fp32 counts as TF32 on Ampere and later unless matmul precision is "highest").
`trainer.peak_tflops` overrides it: for a device the table lacks (Lightning warns "FLOPs not found" and MFU is
left out) or to count against a different peak. A CPU has no listed peak.
"""
from __future__ import annotations

import platform

import torch


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls run in under Lightning `precision` ("bf16-mixed" -> bfloat16, "32-true" -> float32)."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    if precision.startswith("64"):
        return torch.float64
    return torch.float32


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
    """Peak FLOP/s of one `device` at `precision`: `override_tflops` (trainer.peak_tflops) if set, else Lightning's
    table; None when unknown (CPU, an unlisted GPU)."""
    if override_tflops:
        return float(override_tflops) * 1e12
    device = torch.device(device)
    if device.type not in ("cuda", "xla"):
        return None
    from lightning.fabric.utilities.throughput import get_available_flops
    flops = get_available_flops(device, compute_dtype(precision))
    return float(flops) if flops else None
