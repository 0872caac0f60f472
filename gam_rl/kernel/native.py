"""The LSTM cell's elementwise math as one compiled loop per step (gam_rl/kernel/lstm_cell.c).

At the cpu profile's 2 x 64 the step's matmul is small, and the 8 to 11 separate torch ops of the
cell's elementwise math (each a pass over memory with its own dispatch) cost as much as the matmul:
this module compiles the cell forward (with an inline polynomial exp: libm's vector expf made the
cell cost as much as the matmul), its backward, the sampler (a block of samples through all its
steps, or, without torch's sgemm, its per-step bookkeeping), the no-gradient scorer, the dropout
masks and the output head's log-softmax as plain C (gcc or cc, -O3 -march=native, OpenMP through the
libgomp that torch itself loaded), once per machine and source, into a cache folder, and calls them
through ctypes on the tensors' memory. torch.compile was measured on the same cell first: 30 s to
compile per process and 0.76 ms per call at 4096 x 64 against 0.94 ms for the in-place torch ops
(docs/measurements.md).

Where torch's CPU library exports MKL's sgemm (`sgemm_address()`), the teacher-forcing loops over
the steps of a layer, forward and backward, also run in C (gam_layer_forward / _backward), calling
that sgemm for each step's matmul: the same library and threads as torch.mm, and no Python between
steps. GAM_RL_NATIVE_SGEMM=0 keeps those loops in Python.

`kernels()` returns the loaded library, or None when it is switched off (GAM_RL_NATIVE=0), when
no C compiler is found or the build fails (a warning says why, once): kernel/lstm.py then runs its
torch ops, with the same results to float rounding.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("lstm_cell.c")
# -ffast-math at compile time only: linked into a shared library it would set the process's
# flush-to-zero flags (crtfastmath); exp's inputs are clamped in the source, so no infinities
COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC", "-std=c11"]
# x86: let the vectoriser use 512-bit registers where the CPU has them (gcc defaults to 256; the cell
# is compute-bound on its exps); the flag is x86-only, and a no-op without AVX-512
if platform.machine().lower() in ("x86_64", "amd64"):
    COMPILE_FLAGS.insert(2, "-mprefer-vector-width=512")
_state: dict = {}


def cache_dir() -> Path:
    """GAM_RL_NATIVE_CACHE, else $XDG_CACHE_HOME/gam_rl/native, else ~/.cache/gam_rl/native."""
    if os.environ.get("GAM_RL_NATIVE_CACHE"):
        return Path(os.environ["GAM_RL_NATIVE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gam_rl" / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "gcc", "cc"):
        exe = name.split()[0] if name else None
        if exe and shutil.which(exe):
            return exe
    return None


def _torch_libgomp() -> Path | None:
    """torch's own OpenMP runtime (linking it keeps one thread pool in the process), if it has one."""
    lib = Path(torch.__file__).parent / "lib"
    found = sorted(lib.glob("libgomp*.so*"))
    return found[0] if found else None


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and its flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _options() -> tuple[list[str], list[str]]:
    """The OpenMP compile flags and the link arguments: torch's libgomp where it has one."""
    gomp = _torch_libgomp()
    return (["-fopenmp"], [str(gomp)]) if gomp is not None else (["-fopenmp-simd"], [])


def _target(cc: str) -> Path:
    """The cached library's path, keyed by the source's content (not its path), the flags, the
    compiler's version and the CPU: a changed source or machine never reuses an old build."""
    omp, link = _options()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(COMPILE_FLAGS + omp + link), version, _cpu_id(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    return cache_dir() / f"lstm_cell_{key}.so"


def _build(cc: str) -> Path:
    omp, link = _options()
    target = _target(cc)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / "lstm_cell.o", Path(tmp) / target.name
        for cmd in ([cc, *COMPILE_FLAGS, *omp, "-c", str(SOURCE), "-o", str(obj)],
                    [cc, "-shared", str(obj), "-o", str(lib), *link, "-lmvec", "-lm"]):
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0 and "-lmvec" in cmd:  # no libmvec (not glibc on x86_64): scalar exp
                cmd = [c for c in cmd if c != "-lmvec"]
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()[-2000:]}")
        os.replace(lib, target)  # atomic: concurrent jobs building the same key are harmless
    return target


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.gam_cell_forward.argtypes = [i64, i64, ptr, i64, ptr, ptr, ptr, i64, ptr, ptr, i32]
    lib.gam_cell_forward.restype = None
    lib.gam_cell_backward.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i32, ptr, ptr, i64, i64]
    lib.gam_cell_backward.restype = None
    lib.gam_sample_step.argtypes = [i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64]
    lib.gam_sample_step.restype = i64
    lib.gam_layer_forward.argtypes = [ptr, i64, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr,
                                      i64, i32, i64]
    lib.gam_layer_forward.restype = None
    lib.gam_layer_backward.argtypes = [ptr, i64, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, i32,
                                       ptr, ptr, i64, ptr, ptr, i64]
    lib.gam_layer_backward.restype = None
    lib.gam_score_rows.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64,
                                   ptr, ptr, ptr, i32]
    lib.gam_score_rows.restype = None
    lib.gam_score_scratch.argtypes = [i64, i64, i64, i64, i64]
    lib.gam_score_scratch.restype = i64
    lib.gam_sample_rows.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr,
                                    i64, i64, i64, ptr, ptr, i32]
    lib.gam_sample_rows.restype = None
    lib.gam_sample_scratch.argtypes = [i64, i64, i64, i64]
    lib.gam_sample_scratch.restype = i64
    lib.gam_dropout_mask.argtypes = [i64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, ptr, i32]
    lib.gam_dropout_mask.restype = None
    lib.gam_head_logp.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, i32]
    lib.gam_head_logp.restype = None
    lib.gam_head_backward.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, i64]
    lib.gam_head_backward.restype = None
    return lib


def sgemm_address() -> int | None:
    """The address of the sgemm_ (Fortran BLAS) that torch's CPU library exports, i.e. torch's own
    MKL, for the compiled layer loops (gam_layer_forward / _backward); None where torch has no MKL or
    does not export it (those loops then run in Python, a matmul per step through torch)."""
    if "sgemm" not in _state:
        _state["sgemm"] = None
        path = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
        if os.environ.get("GAM_RL_NATIVE_SGEMM", "1") != "0" and torch.backends.mkl.is_available() and path.exists():
            try:
                _state["sgemm"] = ctypes.cast(ctypes.CDLL(str(path)).sgemm_, ctypes.c_void_p).value
            except (OSError, AttributeError):  # not loadable, or no exported sgemm_
                pass
    return _state["sgemm"]


@contextlib.contextmanager
def sequential_sgemm():
    """MKL single-threaded on this thread while a compiled loop calls sgemm_address()'s sgemm: the loops
    share their work between threads themselves, and a loop that runs on one thread (a batch too small
    to share, e.g. r's batch of 100 rows in one chunk) would otherwise have MKL fork and join its threads
    for every step's small sgemm (2 threads on a busy 2-core host: r's training step at 2 x 64 went from
    7 ms to 70-500 ms). A no-op where torch's library does not export mkl_set_num_threads_local."""
    if "mkl_local" not in _state:
        _state["mkl_local"] = None
        if sgemm_address() is not None:
            try:
                fn = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).MKL_Set_Num_Threads_Local
                fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                _state["mkl_local"] = fn
            except (OSError, AttributeError):
                pass
    fn = _state["mkl_local"]
    if fn is None:
        yield
        return
    previous = fn(1)  # the thread's own setting before (0: none, MKL's global one)
    try:
        yield
    finally:
        fn(previous)


def kernels() -> ctypes.CDLL | None:
    """The compiled kernels, or None (switched off, no compiler, or a failed build: warned once)."""
    if os.environ.get("GAM_RL_NATIVE", "1") == "0":
        return None
    if "lib" not in _state:
        _state["lib"] = None
        cc = _compiler()
        if cc is None:
            warnings.warn("gam_rl: no C compiler found: the LSTM cell runs as torch ops (slower at small hidden "
                          "sizes); set GAM_RL_NATIVE=0 to silence this", stacklevel=2)
        else:
            try:
                _state["lib"] = _load(_build(cc))
            except (OSError, RuntimeError) as err:
                warnings.warn(f"gam_rl: building the native LSTM cell failed, using torch ops: {err}", stacklevel=2)
    return _state["lib"]
