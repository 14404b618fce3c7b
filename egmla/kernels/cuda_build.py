"""Build and launch a CUDA C++ kernel file of this package at run time, for kernels that Triton cannot express well
(studies/grouped_decode_cuda.cu). No extension build and no PyTorch headers: the source is compiled to a cubin by `nvcc`
when one is on PATH (or under CUDA_HOME), else by NVRTC through PyTorch (`torch.cuda._utils`), loaded with the
CUDA driver API and launched on PyTorch's current stream (so CUDA-graph capture records it). Cubins are cached
per (source, defines, GPU architecture) in memory and under ~/.cache/egmla/cuda."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
ARG_TYPES = {"ptr": ctypes.c_void_p, "i32": ctypes.c_int, "i64": ctypes.c_longlong, "f32": ctypes.c_float}


class CudaBuildError(RuntimeError):
    """The kernel source could not be compiled or loaded here (the message says what to install)."""


@functools.lru_cache(maxsize=1)
def _driver() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise CudaBuildError(f"libcuda.so.1 not found ({e}): a CUDA driver is needed to launch CUDA kernels") from e


def _check(result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        _driver().cuGetErrorName(result, ctypes.byref(name))
        raise CudaBuildError(f"{what} failed: CUDA driver error {result} ({(name.value or b'?').decode()})")


def find_nvcc() -> str | None:
    """nvcc on PATH, else under CUDA_HOME / CUDA_PATH / /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def source_with_defines(filename: str, defines: dict[str, int]) -> str:
    body = (_HERE / filename).read_text()
    return "".join(f"#define {k} {v}\n" for k, v in sorted(defines.items())) + body


def compile_cubin(filename: str, defines: dict[str, int], arch: str, nvcc: str | None = None) -> bytes:
    """The cubin of `filename` (in this package) for `arch` (e.g. "90"), with `defines` prepended. nvcc when found,
    else NVRTC; the nvcc result is cached on disk."""
    source = source_with_defines(filename, defines)
    nvcc = nvcc or find_nvcc()
    flags = os.environ.get("EGMLA_NVCC_FLAGS", "").split()  # e.g. -lineinfo for Nsight Compute's source view
    key = hashlib.sha256(f"{arch}\n{nvcc}\n{flags}\n{source}".encode()).hexdigest()[:24]
    cache = Path(os.environ.get("EGMLA_CUDA_CACHE", Path.home() / ".cache" / "egmla" / "cuda"))
    cached = cache / f"{Path(filename).stem}-{key}.cubin"
    if cached.is_file():
        return cached.read_bytes()
    if nvcc:
        with tempfile.TemporaryDirectory() as tmp:
            src, out = Path(tmp) / Path(filename).name, Path(tmp) / "out.cubin"
            src.write_text(source)
            done = subprocess.run([nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", *flags, "-o", str(out), str(src)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise CudaBuildError(f"nvcc could not compile {filename}:\n{done.stderr[-4000:]}")
            cubin = out.read_bytes()
    else:
        try:
            from torch.cuda._utils import _nvrtc_compile
        except ImportError as e:
            raise CudaBuildError("no nvcc on PATH or under CUDA_HOME, and this PyTorch has no NVRTC helper "
                                 "(torch.cuda._utils._nvrtc_compile): install the CUDA toolkit's nvcc") from e
        try:
            cubin, _ = _nvrtc_compile(source, "grouped_fused", arch)
        except RuntimeError as e:
            raise CudaBuildError(f"NVRTC could not compile {filename}: {e}") from e
    try:  # the cache is a convenience: a read-only home loses nothing
        cache.mkdir(parents=True, exist_ok=True)
        tmp_path = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp_path.write_bytes(cubin)
        os.replace(tmp_path, cached)
    except OSError:
        pass
    return cubin


class CudaKernel:
    """One `extern "C" __global__` function of a loaded module; call with (grid, block, shared bytes, args) where
    args are (type, value) with type one of ARG_TYPES; tensors as ("ptr", tensor)."""

    def __init__(self, function: ctypes.c_void_p, name: str):
        self.function, self.name, self._shared_optin = function, name, 48 * 1024

    def allow_shared(self, nbytes: int) -> None:
        if nbytes > self._shared_optin:
            _check(_driver().cuFuncSetAttribute(self.function, 8, ctypes.c_int(nbytes)),  # MAX_DYNAMIC_SHARED_SIZE
                   f"{self.name}: {nbytes} B of shared memory")
            self._shared_optin = nbytes

    def __call__(self, grid, block, shared: int, args) -> None:
        self.allow_shared(shared)
        values = []
        for kind, value in args:
            if kind == "ptr":
                value = value.data_ptr() if isinstance(value, torch.Tensor) else int(value)
            values.append(ARG_TYPES[kind](value))
        params = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values))
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
        _check(_driver().cuLaunchKernel(self.function, *map(ctypes.c_uint, grid), *map(ctypes.c_uint, block),
                                        ctypes.c_uint(shared), stream, params, None), f"launching {self.name}")


_modules: dict = {}


def load_kernels(filename: str, defines: dict[str, int], names: tuple[str, ...],
                 device: torch.device) -> dict[str, CudaKernel]:
    """The kernels `names` of `filename` built for `device` (compiled once per process and device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    key = (filename, tuple(sorted(defines.items())), names, index)
    if key not in _modules:
        cubin = compile_cubin(filename, defines, f"{major}{minor}")
        with torch.cuda.device(index):
            torch.cuda.current_stream()  # makes PyTorch's primary context current on this thread
            module = ctypes.c_void_p()
            _check(_driver().cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(cubin)), f"loading {filename}")
            kernels = {}
            for name in names:
                function = ctypes.c_void_p()
                _check(_driver().cuModuleGetFunction(ctypes.byref(function), module, name.encode()),
                       f"{filename}: function {name}")
                kernels[name] = CudaKernel(function, name)
        _modules[key] = kernels
    return _modules[key]
