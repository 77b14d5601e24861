"""The CPU WKV kernel (wkv_cpu.cpp): built on first use, cached, called through ctypes.

The source is compiled with the system's C++ compiler (`$CXX`, else c++, g++ or clang++) into
`$TORCH_EXTENSIONS_DIR` or the user cache folder (`paths.cache_dir()/kernels`), under a name
that hashes the source, the compiler and its flags, so a changed source or another machine's
flags never load a stale library. It has a plain C ABI and includes no torch or Python headers:
no ninja, no pybind11, about a second to build. When it cannot be built or loaded (no compiler,
a failed build), `library()` says why once, as a warning, and returns None; the model then runs
the pure-torch chunked WKV (`rwkv.wkv_chunked`), which computes the same function.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Optional

import torch

from cmi_daemon import paths

SOURCE = Path(__file__).with_name("wkv_cpu.cpp")
ABI_VERSION = 1
BUILD_TIMEOUT_S = 300
COMPILERS = ("c++", "g++", "clang++")

_library: Optional[ctypes.CDLL] = None
_problem: Optional[str] = None
_tried = False


def compiler() -> Optional[str]:
    if os.environ.get("CXX"):
        return os.environ["CXX"]
    return next((found for name in COMPILERS if (found := shutil.which(name))), None)


def compile_flags() -> list[str]:
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread"]
    if (platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")):
        flags += ["-mavx2", "-mfma"]
    return flags


def cache_folder() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else paths.cache_dir() / "kernels"


def _build(cxx: str) -> Path:
    flags = compile_flags()
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cxx, *flags]).encode()).hexdigest()[:16]
    folder = cache_folder()
    built = folder / f"cmi_wkv_cpu-{key}.so"
    if built.exists():
        return built
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{built.name}.{os.getpid()}.tmp"
    try:
        result = subprocess.run([cxx, *flags, str(SOURCE), "-o", str(temporary)], capture_output=True, text=True,
                                timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            message = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
            raise RuntimeError(f"{cxx} failed: {message}")
        os.replace(temporary, built)  # concurrent builders (DDP ranks) each replace it whole
    finally:
        temporary.unlink(missing_ok=True)
    return built


def _bind(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    if library.cmi_wkv_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path} has another ABI version")
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    for dtype in ("f32", "f64"):
        getattr(library, f"cmi_wkv_forward_{dtype}").argtypes = [integer] * 3 + [pointer] * 8 + [integer]
        getattr(library, f"cmi_wkv_backward_{dtype}").argtypes = [integer] * 3 + [pointer] * 15 + [integer]
    return library


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel, building it on first use; None (and one warning) when it cannot be had."""
    global _library, _problem, _tried
    if not _tried:
        _tried = True
        cxx = compiler()
        try:
            if cxx is None:
                raise RuntimeError(f"no C++ compiler found (set CXX, or install one of {', '.join(COMPILERS)})")
            _library = _bind(_build(cxx))
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as error:
            _problem = str(error)
            warnings.warn(f"the CPU WKV kernel is not available ({_problem}): the pure-torch WKV is used instead",
                          RuntimeWarning, stacklevel=2)
    return _library


def problem() -> Optional[str]:
    """Why the kernel is unavailable (after library() was called), or None."""
    return _problem


def forget() -> None:
    """Drop the in-process result, so the next library() call tries again (tests)."""
    global _library, _problem, _tried
    _library, _problem, _tried = None, None, False


def applicable(k: torch.Tensor, *state: torch.Tensor) -> bool:
    """Whether WKV may run: CPU float32/float64 tensors, outside ONNX export and tracing, with a
    carried-in state that needs no gradient (the kernel gives it none)."""
    return (k.device.type == "cpu" and k.dtype in (torch.float32, torch.float64)
            and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export()
            and not any(s.requires_grad for s in state) and library() is not None)


class WKV(torch.autograd.Function):
    """(w, u (C,), k, v (B, T, C), aa, bb, pp (B, C)) -> (wkv (B, T, C), aa, bb, pp after the last token)."""

    @staticmethod
    def forward(ctx, w, u, k, v, aa, bb, pp):
        dtype = k.dtype
        w, u = w.to(dtype).contiguous(), u.to(dtype).contiguous()
        k, v = k.contiguous(), v.to(dtype).contiguous()
        state_in = [s.to(dtype).contiguous() for s in (aa, bb, pp)]
        state_out = [s.clone() for s in state_in]
        y = torch.empty_like(k)
        batch, n_tokens, n_channels = k.shape
        function = library().cmi_wkv_forward_f32 if dtype == torch.float32 else library().cmi_wkv_forward_f64
        function(batch, n_tokens, n_channels, *(t.data_ptr() for t in (w, u, k, v, y, *state_out)),
                 torch.get_num_threads())
        ctx.save_for_backward(w, u, k, v, y, *state_in)
        ctx.mark_non_differentiable(*state_out)
        return (y, *state_out)

    @staticmethod
    def backward(ctx, grad_y, *_):
        w, u, k, v, y, aa, bb, pp = ctx.saved_tensors
        grad_y = grad_y.to(k.dtype).contiguous()
        batch, n_tokens, n_channels = k.shape
        grad_w, grad_u = (k.new_empty(batch, n_channels) for _ in range(2))
        grad_k, grad_v, scratch_q, scratch_r = (torch.empty_like(k) for _ in range(4))
        function = library().cmi_wkv_backward_f32 if k.dtype == torch.float32 else library().cmi_wkv_backward_f64
        function(batch, n_tokens, n_channels,
                 *(t.data_ptr() for t in (w, u, k, v, y, grad_y, aa, bb, pp, grad_w, grad_u, grad_k, grad_v,
                                         scratch_q, scratch_r)), torch.get_num_threads())
        return grad_w.sum(0), grad_u.sum(0), grad_k, grad_v, None, None, None
