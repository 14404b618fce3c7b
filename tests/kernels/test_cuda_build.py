"""egmla/kernels/cuda_build.py without a GPU: the cubin cache (its key, its writes), the NVRTC fallback where no nvcc is
found, and the checks of a launch's arguments. nvcc is a fake script here (what it prints and writes is the test's), so
these run on any machine; the real compilers are exercised by test_grouped_cuda_study.py and test_kernel_resources.py
where they are installed."""
import ctypes
import os
import re
from pathlib import Path

import pytest
import torch

from egmla.kernels import cuda_build
from egmla.kernels.cuda_build import CudaBuildError, CudaKernel, compile_cubin

STUDY = "studies/grouped_decode_cuda.cu"
DEFINES = {"N_HEADS": 12, "SEG": 512, "HPB": 4, "MIN_BLOCKS": 1}


def fake_nvcc(path: Path, release: str) -> str:
    """An nvcc that says it is `release` and writes a 'cubin' naming it (and its arguments) to -o; each compile is
    logged beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.parent / "calls.log"
    path.write_text(f"""#!/bin/sh
if [ "$1" = "--version" ]; then
  echo "nvcc: NVIDIA (R) Cuda compiler driver"; echo "Cuda compilation tools, release {release}"; exit 0
fi
out=""; prev=""
for a in "$@"; do if [ "$prev" = "-o" ]; then out="$a"; fi; prev="$a"; done
echo compile >> "{log}"
printf '\\177ELF release {release} %s' "$*" > "$out"
""")
    path.chmod(0o755)
    return str(path)


def compiles(path: Path) -> int:
    log = path.parent / "calls.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EGMLA_CUDA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EGMLA_NVCC_FLAGS", raising=False)
    return tmp_path / "cache"


def test_the_cache_key_follows_source_defines_arch_and_flags(tmp_path, cache, monkeypatch):
    """A cached cubin is reused for the same inputs, and rebuilt when the defines, the architecture, the nvcc flags or
    the source change."""
    nvcc = fake_nvcc(tmp_path / "bin" / "nvcc", "13.0")
    first = compile_cubin(STUDY, DEFINES, "90", nvcc)
    assert first.startswith(b"\x7fELF release 13.0") and "-arch=sm_90" in first.decode()
    assert compile_cubin(STUDY, DEFINES, "90", nvcc) == first and compiles(Path(nvcc)) == 1
    compile_cubin(STUDY, {**DEFINES, "SEG": 256}, "90", nvcc)
    assert "-arch=sm_80" in compile_cubin(STUDY, DEFINES, "80", nvcc).decode()
    monkeypatch.setenv("EGMLA_NVCC_FLAGS", "-lineinfo")
    assert "-lineinfo" in compile_cubin(STUDY, DEFINES, "90", nvcc).decode()
    monkeypatch.delenv("EGMLA_NVCC_FLAGS")
    package = tmp_path / "package"
    (package / "studies").mkdir(parents=True)
    source = (cuda_build._HERE / STUDY).read_text()
    (package / STUDY).write_text(source)
    monkeypatch.setattr(cuda_build, "_HERE", package)
    compile_cubin(STUDY, DEFINES, "90", nvcc)
    assert compiles(Path(nvcc)) == 4  # the same source elsewhere: cached
    (package / STUDY).write_text(source + "\n// edited\n")
    compile_cubin(STUDY, DEFINES, "90", nvcc)
    assert compiles(Path(nvcc)) == 5 and len(list(cache.glob("*.cubin"))) == 5


def test_another_compiler_behind_the_same_nvcc_path_rebuilds(tmp_path, cache):
    """/usr/local/bin/nvcc on the CPU machine is a script that runs /usr/local/cuda-13.0/bin/nvcc, and /usr/local/cuda
    is a link that installs move: the same path can be another release. A cubin of the old release (one the driver may
    refuse, or whose registers `egmla bench kernel-resources --kernels cuda` would report as the new one's) must not
    be served from the cache."""
    nvcc = fake_nvcc(tmp_path / "bin" / "nvcc", "13.0")
    assert compile_cubin(STUDY, DEFINES, "90", nvcc).startswith(b"\x7fELF release 13.0")
    fake_nvcc(tmp_path / "bin" / "nvcc", "12.8")  # the toolkit behind the path changed
    assert compile_cubin(STUDY, DEFINES, "90", nvcc).startswith(b"\x7fELF release 12.8")
    assert compile_cubin(STUDY, DEFINES, "90", nvcc).startswith(b"\x7fELF release 12.8")
    assert compiles(Path(nvcc)) == 2


def test_an_nvcc_that_does_not_run_is_a_build_error_naming_it(tmp_path, cache):
    broken = tmp_path / "bin" / "nvcc"
    broken.parent.mkdir()
    broken.write_text("#!/bin/sh\nexec /nonexistent/cuda-13.0/bin/nvcc \"$@\"\n")  # a wrapper left behind
    broken.chmod(0o755)
    for nvcc in (str(broken), str(tmp_path / "missing" / "nvcc")):
        with pytest.raises(CudaBuildError, match=re.escape(nvcc)):
            compile_cubin(STUDY, DEFINES, "90", nvcc)


def test_writers_of_one_process_do_not_share_a_temporary_file(tmp_path, cache, monkeypatch):
    """Two writers of one cache entry in one process (threads; or processes of the same pid in two containers sharing
    a home) must not write the same temporary file: one would truncate and rewrite the file the other is renaming into
    place (a torn cubin in the cache, for good if that writer dies). Here the second writer runs between the first's
    write and its rename."""
    nvcc = fake_nvcc(tmp_path / "bin" / "nvcc", "13.0")
    real_replace, renames, failures, started = os.replace, [], [], []

    def replace(src, dst):
        if not started:
            started.append(True)
            (cache / Path(dst).name).unlink(missing_ok=True)
            compile_cubin(STUDY, DEFINES, "90", nvcc)  # the other writer, from start to end
        renames.append(str(src))
        try:
            real_replace(src, dst)
        except OSError as error:
            failures.append(error)
            raise

    monkeypatch.setattr(os, "replace", replace)
    cubin = compile_cubin(STUDY, DEFINES, "90", nvcc)
    assert len(renames) == 2 and renames[0] != renames[1] and not failures
    assert [p.suffix for p in cache.iterdir()] == [".cubin"] and next(cache.iterdir()).read_bytes() == cubin


class FakeNVRTC:
    """libnvrtc's calls as compile_cubin makes them, emulating what the real library does with a name expression that
    names no function of the source (libnvrtc 13.5: 'identifier "grouped_fused" is undefined')."""

    def __init__(self):
        self.sources, self.names, self.log = {}, {}, b""

    def nvrtcVersion(self, major, minor):
        major._obj.value, minor._obj.value = 13, 5
        return 0

    def nvrtcCreateProgram(self, prog, source, name, *_):
        prog._obj.value = len(self.sources) + 1
        self.sources[prog._obj.value] = source if isinstance(source, bytes) else source.value
        return 0

    def nvrtcAddNameExpression(self, prog, name):
        self.names.setdefault(prog.value if hasattr(prog, "value") else prog, []).append(name)
        return 0

    def nvrtcCompileProgram(self, prog, count, options):
        key = prog.value if hasattr(prog, "value") else prog
        source = self.sources[key].decode()
        for name in self.names.get(key, []):
            if not re.search(rf"\b{re.escape(name.decode())}\s*\(", source):
                self.log = f'error: identifier "{name.decode()}" is undefined'.encode()
                return 6  # NVRTC_ERROR_COMPILATION
        self.options = [options[i] for i in range(count)]
        return 0

    def nvrtcGetProgramLogSize(self, prog, size):
        size._obj.value = len(self.log) + 1
        return 0

    def nvrtcGetProgramLog(self, prog, buffer):
        ctypes.memmove(buffer, self.log + b"\0", len(self.log) + 1)
        return 0

    def nvrtcGetCUBINSize(self, prog, size):
        size._obj.value = 8
        return 0

    def nvrtcGetCUBIN(self, prog, buffer):
        ctypes.memmove(buffer, b"\x7fELFfake", 8)
        return 0

    def nvrtcGetLoweredName(self, prog, name, lowered):
        return 0

    def nvrtcDestroyProgram(self, prog):
        return 0

    def nvrtcGetErrorString(self, result, text):
        return 0


def without_nvcc(monkeypatch, nvrtc):
    """No nvcc, no CUDA_HOME (no toolkit: the case NVRTC is the fallback for), and `nvrtc` as the loadable libnvrtc
    (None: none loads)."""
    import torch.cuda._utils
    import torch.utils.cpp_extension

    monkeypatch.setattr(cuda_build, "find_nvcc", lambda: None)
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", None)
    real_cdll = ctypes.CDLL

    def load(name, *args, **kwargs):
        if "nvrtc" in str(name):
            if nvrtc is None:
                raise OSError(f"{name}: cannot open shared object file: No such file or directory")
            return nvrtc
        return real_cdll(name, *args, **kwargs)

    def torch_loader():
        if nvrtc is None:
            raise OSError("Could not find any NVRTC library")
        return nvrtc

    monkeypatch.setattr(ctypes, "CDLL", load)
    monkeypatch.setattr(torch.cuda._utils, "_get_gpu_rtc_library", torch_loader)


def test_without_nvcc_nvrtc_builds_any_source_and_needs_no_cuda_home(tmp_path, cache, monkeypatch):
    """The fallback where no nvcc is found must work without a toolkit (PyTorch's helper wants CUDA_HOME for include
    paths that these header-free sources never use) and for any source (not only one that defines grouped_fused)."""
    nvrtc = FakeNVRTC()
    without_nvcc(monkeypatch, nvrtc)
    (tmp_path / "other.cu").write_text('extern "C" __global__ void add_one(float* x) { x[threadIdx.x] += 1.0f; }\n')
    monkeypatch.setattr(cuda_build, "_HERE", tmp_path)
    assert compile_cubin("other.cu", {"N": 4}, "90") == b"\x7fELFfake"
    assert b"--gpu-architecture=sm_90" in nvrtc.options
    assert len(list(cache.glob("other-*.cubin"))) == 1


def test_without_nvcc_or_nvrtc_the_error_says_what_to_install(cache, monkeypatch):
    without_nvcc(monkeypatch, None)
    with pytest.raises(CudaBuildError, match="no nvcc .* NVRTC .*install"):
        compile_cubin(STUDY, DEFINES, "90")


def real_nvrtc_loads() -> bool:
    for name in ("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


@pytest.mark.skipif(not real_nvrtc_loads(), reason="no libnvrtc on the loader's path")
def test_real_nvrtc_builds_the_study_and_other_sources(tmp_path, cache, monkeypatch):
    import torch.utils.cpp_extension

    monkeypatch.setattr(cuda_build, "find_nvcc", lambda: None)
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", None)
    assert compile_cubin(STUDY, DEFINES, "90")[:4] == b"\x7fELF"
    (tmp_path / "other.cu").write_text('extern "C" __global__ void add_one(float* x) { x[threadIdx.x] += 1.0f; }\n')
    monkeypatch.setattr(cuda_build, "_HERE", tmp_path)
    assert compile_cubin("other.cu", {}, "90")[:4] == b"\x7fELF"
    (tmp_path / "bad.cu").write_text('extern "C" __global__ void bad(float* x) { x[threadIdx.x] += y; }\n')
    with pytest.raises(CudaBuildError, match=r"(?s)NVRTC could not compile bad.cu.*identifier \"y\" is undefined"):
        compile_cubin("bad.cu", {}, "90")


def test_launch_arguments_are_checked_before_anything_runs():
    """A host tensor's address handed to a kernel is an illegal access that poisons the CUDA context for the whole
    process (Triton refuses such a tensor; the offloaded gate tables live in host memory), and ctypes wraps integers
    that do not fit their C type without a word: each is a ValueError naming the argument, raised before the launch."""
    kernel = CudaKernel(ctypes.c_void_p(), "k")
    for args, message in (([("i32", 2 ** 31)], r"argument 0 \('i32', 2147483648\): outside"),
                          ([("i32", 1), ("i64", -2 ** 63 - 1)], "argument 1 .*outside"),
                          ([("ptr", torch.zeros(4))], "argument 0: a tensor on cpu"),
                          ([("u8", 1)], "argument 0: type 'u8' is none of ptr, i32, i64, f32")):
        with pytest.raises(ValueError, match=message):
            kernel((1,), (32,), 0, args)
    with pytest.raises(ValueError, match=r"grid \(1, 1, 1, 1\): 1 to 3 positive sizes"):
        kernel((1, 1, 1, 1), (32,), 0, [("i32", 1)])
