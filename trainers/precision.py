"""Whether bfloat16 autocast pays on this machine: the default precision of built-in training.

On a CPU, autocast to bfloat16 is only faster where the instruction set has bfloat16 dot
products (AVX-512 BF16 or AMX); elsewhere PyTorch emulates it and the step gets slower, so
the default follows the hardware and a user's explicit ``amp`` always wins."""

from __future__ import annotations

import torch


def cpu_has_bf16_dot_products() -> bool:
    """True on x86 CPUs with AVX-512 BF16 or AMX tiles (PyTorch's own capability probes)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def bf16_autocast_pays() -> bool:
    """Default for ``DistillConfig.amp`` where conaclip picks it: a bfloat16-capable GPU if the
    loop will use one (it takes cuda whenever it is there), else the CPU's instruction set."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16_dot_products()
