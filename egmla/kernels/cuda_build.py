"""Build and launch a CUDA C++ kernel file of this package at run time, for kernels that Triton cannot express well
(studies/grouped_decode_cuda.cu). No extension build and no PyTorch headers: the source is compiled to a cubin by `nvcc`
when one is on PATH (or under CUDA_HOME), else by NVRTC (libnvrtc, which PyTorch's CUDA wheels ship; no toolkit
needed: the sources include no header), loaded with the CUDA driver API and launched on PyTorch's current stream (so
CUDA-graph capture records it). Cubins are cached per (source, defines, GPU architecture, compiler release, nvcc
flags) in memory and under ~/.cache/egmla/cuda."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import operator
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
    else NVRTC; cached on disk, keyed by the compiler's release too (one nvcc path can run another toolkit after an
    install: /usr/local/cuda is a link, /usr/local/bin/nvcc may be a script)."""
    source = source_with_defines(filename, defines)
    nvcc = nvcc or find_nvcc()
    flags = os.environ.get("EGMLA_NVCC_FLAGS", "").split()  # e.g. -lineinfo for Nsight Compute's source view
    nvrtc = None if nvcc else _nvrtc()
    compiler = f"{nvcc}\n{_nvcc_version(nvcc)}" if nvcc else _nvrtc_version(nvrtc)
    key = hashlib.sha256(f"{arch}\n{compiler}\n{flags}\n{source}".encode()).hexdigest()[:24]
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
                raise CudaBuildError(f"nvcc could not compile {filename} for sm_{arch}:\n{done.stderr[-4000:]}")
            cubin = out.read_bytes()
    else:
        cubin = _nvrtc_compile(nvrtc, source, filename, arch)
    try:  # the cache is a convenience: a read-only home loses nothing
        cache.mkdir(parents=True, exist_ok=True)
        # a temporary file of this writer's own (not one per pid: threads, or two containers' processes of the same
        # pid sharing a home, would write into the file another is renaming into place)
        fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=f"{cached.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                os.fchmod(file.fileno(), 0o644)
                file.write(cubin)
            os.replace(tmp_name, cached)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    except OSError:
        pass
    return cubin


def _nvcc_version(nvcc: str) -> str:
    """What `nvcc --version` prints (its release): part of the cache key."""
    try:
        done = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    except OSError as e:
        raise CudaBuildError(f"nvcc at {nvcc} does not run ({e}): install the CUDA toolkit, or put a working nvcc on "
                             f"PATH or under CUDA_HOME") from e
    if done.returncode != 0:
        raise CudaBuildError(f"nvcc at {nvcc} does not run (`nvcc --version` exited {done.returncode}: "
                             f"{(done.stderr or done.stdout).strip()[-500:]}): install the CUDA toolkit, or put a "
                             f"working nvcc on PATH or under CUDA_HOME")
    return done.stdout.strip()


def _nvrtc() -> ctypes.CDLL:
    """libnvrtc: the release of PyTorch's CUDA (its wheels ship it, loaded already), else any the loader finds."""
    major = (torch.version.cuda or "").split(".")[0]
    names = ([f"libnvrtc.so.{major}"] if major else []) + ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    errors = []
    for name in dict.fromkeys(names):
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            errors.append(str(e))
    raise CudaBuildError(f"no nvcc on PATH or under CUDA_HOME, and no NVRTC library loads ({'; '.join(errors)}): "
                         f"install the CUDA toolkit's nvcc, or NVRTC (a CUDA build of PyTorch ships it; else pip "
                         f"install nvidia-cuda-nvrtc)")


def _nvrtc_version(lib: ctypes.CDLL) -> str:
    major, minor = ctypes.c_int(), ctypes.c_int()
    if lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)) != 0:
        return "nvrtc ?"
    return f"nvrtc {major.value}.{minor.value}"


def _nvrtc_compile(lib: ctypes.CDLL, source: str, filename: str, arch: str) -> bytes:
    """The cubin of `source` for sm_`arch` by NVRTC: no include paths (the sources include no header) and no kernel
    name to look up (the kernels are extern "C")."""

    def check(result: int, what: str) -> None:
        if result != 0:
            error_string = lib.nvrtcGetErrorString
            error_string.restype = ctypes.c_char_p
            raise CudaBuildError(f"NVRTC: {what} for {filename} failed ({(error_string(result) or b'?').decode()})")

    program = ctypes.c_void_p()
    check(lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), Path(filename).name.encode(), 0, None,
                                 None), "nvrtcCreateProgram")
    try:
        options = [f"--gpu-architecture=sm_{arch}".encode()]
        if lib.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options)) != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(max(size.value, 1))
            lib.nvrtcGetProgramLog(program, log)
            raise CudaBuildError(f"NVRTC could not compile {filename} for sm_{arch}:\n"
                                 f"{log.value.decode(errors='replace')[-4000:]}")
        size = ctypes.c_size_t()
        check(lib.nvrtcGetCUBINSize(program, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(program, cubin), "nvrtcGetCUBIN")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


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
        grid, block = _dims("grid", grid), _dims("block", block)
        values = _marshal(args)  # checked before anything reaches the driver
        self.allow_shared(shared)
        params = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values))
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        _check(_driver().cuLaunchKernel(self.function, *map(ctypes.c_uint, grid), *map(ctypes.c_uint, block),
                                        ctypes.c_uint(shared), stream, params, None), f"launching {self.name}")


_BITS = {"i32": 32, "i64": 64}


def _dims(name: str, dims) -> tuple[int, int, int]:
    dims = tuple(int(d) for d in dims)
    if not 1 <= len(dims) <= 3 or min(dims) < 1:
        raise ValueError(f"{name} {dims}: 1 to 3 positive sizes (x, y, z)")
    return dims + (1,) * (3 - len(dims))


def _marshal(args) -> list:
    """The kernel arguments as ctypes values: a tensor's address only where a kernel can read it (a host tensor's would
    be an illegal access that poisons the CUDA context), integers only within their C type (ctypes wraps silently)."""
    values = []
    for i, (kind, value) in enumerate(args):
        if kind not in ARG_TYPES:
            raise ValueError(f"argument {i}: type {kind!r} is none of {', '.join(ARG_TYPES)}")
        if kind == "ptr":
            if isinstance(value, torch.Tensor):
                if value.device.type != "cuda" and not value.is_pinned():
                    raise ValueError(f"argument {i}: a tensor on {value.device}, whose address a kernel cannot read: "
                                     f"pass a CUDA (or pinned) tensor")
                value = value.data_ptr()
            else:
                value = int(value)
        elif kind in _BITS:
            value, bits = operator.index(value), _BITS[kind]
            if not -2 ** (bits - 1) <= value < 2 ** (bits - 1):
                raise ValueError(f"argument {i} {(kind, value)!r}: outside the range of a {bits}-bit signed integer")
        values.append(ARG_TYPES[kind](value))
    return values


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
