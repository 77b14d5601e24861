"""Where the model runs: ONNX Runtime's execution providers for the inference engine, the torch
device for DIL and training, and why a requested device could not be used.

A device that cannot be used is never an error: the caller falls back to the CPU and says so once
(`onnx_device_problem`, `dil_device`). torch and onnxruntime are imported where they are needed,
so the engine never loads torch and training never loads onnxruntime.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

DEVICES = ("auto", "cpu", "cuda", "mps")
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
ONNX_DEFAULT_LOG_SEVERITY = 2
"""ONNX Runtime's own default (warnings and worse), restored after a quiet session start."""
ONNX_FATAL_ONLY = 4


def onnx_providers(requested: str = "auto") -> list[str]:
    """The providers to ask ONNX Runtime for: CUDA first for `cuda`, and for `auto` when ONNX Runtime
    has it and an NVIDIA driver is installed; else the CPU (ONNX Runtime has no MPS provider)."""
    import onnxruntime as ort

    if requested == "auto":
        wanted = CUDA_PROVIDER in ort.get_available_providers() and ctypes.util.find_library("cuda") is not None
    else:
        wanted = requested == "cuda"
    return [CUDA_PROVIDER, CPU_PROVIDER] if wanted else [CPU_PROVIDER]


def onnx_device(providers_in_use: Sequence[str]) -> str:
    """`cuda` or `cpu`: where a session whose get_providers() is providers_in_use runs its graph."""
    return "cuda" if providers_in_use and providers_in_use[0] == CUDA_PROVIDER else "cpu"


@contextmanager
def quiet_onnx_runtime() -> Iterator[None]:
    """Silence ONNX Runtime's process-wide logger while sessions start: a CUDA provider that fails to
    load prints several lines per session; the caller reports the fallback once instead."""
    import onnxruntime as ort

    ort.set_default_logger_severity(ONNX_FATAL_ONLY)
    try:
        yield
    finally:
        ort.set_default_logger_severity(ONNX_DEFAULT_LOG_SEVERITY)


def onnx_device_problem(requested: str, providers_in_use: Sequence[str]) -> Optional[str]:
    """One line saying why the model does not run on the requested device, or None when it does
    (or when `auto` found no GPU, which is no surprise)."""
    import onnxruntime as ort

    if requested == "mps":
        return "--device mps: ONNX Runtime has no MPS provider; the model runs on the CPU"
    if onnx_device(providers_in_use) == "cuda" or CUDA_PROVIDER not in onnx_providers(requested):
        return None
    if CUDA_PROVIDER not in ort.get_available_providers():
        reason = f"onnxruntime {ort.__version__} has no CUDA provider (install onnxruntime-gpu)"
    else:
        reason = _cuda_provider_load_error() or "it did not start (no NVIDIA GPU or driver?)"
        reason = f"onnxruntime's CUDA provider cannot be used: {reason}"
    return f"--device {requested}: {reason}; the model runs on the CPU"


def _cuda_provider_load_error() -> Optional[str]:
    """The loader's message when onnxruntime-gpu's CUDA provider library cannot be loaded, e.g. a
    missing CUDA or cuDNN library; None when it loads."""
    import onnxruntime as ort

    name = "onnxruntime_providers_cuda.dll" if os.name == "nt" else "libonnxruntime_providers_cuda.so"
    try:
        ctypes.CDLL(str(Path(ort.__file__).parent / "capi" / name))
    except OSError as error:
        return str(error)
    return None


def choose_device():
    """Best available torch device: CUDA, then Apple MPS, then CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def flush_denormals_in_this_thread(device) -> None:
    """On the CPU, flush denormal floats to zero in the calling thread: RWKV's decaying state
    produces many, and they slow CPU work by about an order of magnitude. The setting is the
    thread's own (the CPU's MXCSR register), so the torch thread that trains calls this, never a
    thread that validates what clients send: there a denormal would compare as zero."""
    import torch

    if device.type == "cpu":
        torch.set_flush_denormal(True)


def dil_device(requested: str = "auto"):
    """The torch device DIL learns on for the daemon's requested device: (device, None) when torch
    can use it, else (the CPU, one line saying why)."""
    import torch

    if requested == "auto":
        return choose_device(), None
    problem = None
    if requested == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "no NVIDIA GPU or driver found"
        problem = f"torch {torch.__version__} cannot use CUDA ({build})"
    mps = getattr(torch.backends, "mps", None)
    if requested == "mps" and not (mps is not None and mps.is_available()):
        problem = f"torch {torch.__version__} cannot use Apple's MPS here"
    if problem is not None or requested == "cpu":
        return torch.device("cpu"), (None if problem is None else f"--device {requested}: {problem}; "
                                     "DIL learns on the CPU")
    return torch.device(requested), None
