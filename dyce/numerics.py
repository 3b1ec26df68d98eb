"""Which device and which training numerics to use, decided by what the hardware does natively.

bfloat16 autocast only pays where the hardware has bf16 arithmetic: on a CPU with AVX512-BF16 or
AMX-BF16 oneDNN's bf16 kernels train ~1.4x faster than fp32, but on a CPU without them torch
emulates bf16 and the same step runs up to ~8x *slower* than fp32. So ``auto`` asks torch's own
CPU feature probe (cpuinfo, ``torch._C._cpu._get_cpu_capability``) instead of guessing from the
model name; on CUDA, bf16 autocast is native from Ampere on (``torch.cuda.is_bf16_supported``).
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

Precision = Literal["auto", "bf16", "fp32"]

# cpuinfo flags that mean bf16 dot products in hardware (x86). Others (e.g. Arm) report no such
# flag through torch, so they stay on fp32 unless a recipe asks for bf16.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


class Numerics(BaseModel):
    """The resolved choice: where to run, whether to autocast to bf16, and why."""

    model_config = ConfigDict(frozen=True)

    device: str
    precision: Literal["bf16", "fp32"]
    requested: Precision
    reason: str

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    def autocast(self):
        """bf16 autocast on this device, or nothing."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16)

    def describe(self) -> str:
        return f"{self.precision} on {self.device} ({self.reason})"


def cpu_capability() -> dict:
    """torch's cpuinfo probe of this CPU (empty where the build does not expose it)."""
    probe = getattr(torch._C._cpu, "_get_cpu_capability", None)
    return dict(probe()) if probe is not None else {}


def native_cpu_bf16_flags(capability: dict | None = None) -> list[str]:
    capability = cpu_capability() if capability is None else capability
    return [flag for flag in NATIVE_BF16_CPU_FLAGS if capability.get(flag)]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None) -> str:
    """``None``/``auto``: CUDA when available, else the CPU. Anything else must exist here."""
    if device in (None, "", "auto"):
        return default_device()
    parsed = torch.device(device)
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch sees no CUDA device")
    return str(parsed)


def choose_numerics(
    requested: Precision = "auto", device: str | None = None, capability: dict | None = None
) -> Numerics:
    """Resolve ``requested`` for ``device``. ``capability`` (cpuinfo flags) is for tests."""
    device = resolve_device(device)
    kind = torch.device(device).type
    if requested != "auto":
        return Numerics(device=device, precision=requested, requested=requested, reason="set by the recipe")
    if kind == "cuda":
        index = torch.device(device).index or 0
        if torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name(index)
            return Numerics(device=device, precision="bf16", requested=requested, reason=f"native bf16 on {name}")
        return Numerics(device=device, precision="fp32", requested=requested, reason="this GPU has no native bf16")
    if kind == "cpu":
        flags = native_cpu_bf16_flags(capability)
        if flags:
            return Numerics(
                device=device, precision="bf16", requested=requested, reason="CPU has " + " and ".join(flags)
            )
        return Numerics(
            device=device,
            precision="fp32",
            requested=requested,
            reason="CPU has no native bf16 (no " + " / ".join(NATIVE_BF16_CPU_FLAGS) + "); bf16 would be emulated",
        )
    return Numerics(device=device, precision="fp32", requested=requested, reason=f"no bf16 rule for {kind}")
