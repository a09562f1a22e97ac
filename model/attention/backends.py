"""Picks the paged-attention backend by name; above both backends, so neither imports the other's chooser."""

from __future__ import annotations

from types import ModuleType

import torch

from model.attention.cpu import CpuPagedAttention
from model.attention.paged import AttentionBackend, TorchPagedAttention


def make_backend(
    name: str, block_size: int, device: torch.device, kernels: ModuleType | None = None
) -> AttentionBackend:
    """ "torch" anywhere; "cpu" the in-place C++ kernel (`kernels`: the built module of `model.cpu_kernels`);
    "auto" the kernel on CPU when it is available, else PyTorch."""
    if name == "torch" or (name == "auto" and (device.type != "cpu" or kernels is None)):
        return TorchPagedAttention(block_size, device)
    if name in ("cpu", "auto"):
        if kernels is None:
            raise ValueError("attention backend 'cpu' needs the built CPU kernels")
        return CpuPagedAttention(block_size, device, kernels)
    raise ValueError(f"unknown attention backend '{name}' (available: auto, torch, cpu)")
