"""Numerics follow the hardware: bf16 autocast only where bf16 is native, checked against the
kernel's own CPU flags (/proc/cpuinfo), not against torch's probe that the code uses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dyce.numerics import choose_numerics

CPUINFO = Path("/proc/cpuinfo")


def kernel_cpu_flags() -> set[str]:
    for line in CPUINFO.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not CPUINFO.is_file() or not kernel_cpu_flags(), reason="needs Linux x86 /proc/cpuinfo flags")
def test_auto_matches_the_kernels_cpu_flags():
    flags = kernel_cpu_flags()
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    chosen = choose_numerics("auto", "cpu")
    assert chosen.precision == ("bf16" if native else "fp32")
    assert chosen.device == "cpu" and chosen.reason


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ({"avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}, "fp32"),  # AVX-512 alone
        ({"avx2": True}, "fp32"),
        ({}, "fp32"),  # a probe that knows nothing: never guess bf16
        ({"avx512_bf16": True}, "bf16"),
        ({"amx_bf16": True, "avx512_bf16": False}, "bf16"),
    ],
)
def test_auto_on_cpus_with_and_without_native_bf16(capability, expected):
    chosen = choose_numerics("auto", "cpu", capability=capability)
    assert chosen.precision == expected
    assert isinstance(chosen.autocast(), torch.autocast) == (expected == "bf16")


@pytest.mark.parametrize("requested", ["bf16", "fp32"])
def test_a_recipe_setting_overrides_the_hardware(requested):
    for capability in ({"avx512_bf16": True}, {}):
        chosen = choose_numerics(requested, "cpu", capability=capability)
        assert chosen.precision == requested and "recipe" in chosen.reason


def test_bf16_autocast_really_computes_in_bf16_and_fp32_does_not():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with choose_numerics("bf16", "cpu").autocast():
        assert layer(x).dtype == torch.bfloat16
    with choose_numerics("fp32", "cpu").autocast():
        assert layer(x).dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_asking_for_cuda_without_one_is_refused():
    with pytest.raises(ValueError, match="CUDA"):
        choose_numerics("auto", "cuda")
    assert choose_numerics("auto", None).device == "cpu"
