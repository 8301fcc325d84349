"""Build fastar._C: the op library (CPU always, CUDA when asked for or available).

Environment:
  FASTAR_CUDA           "1" force CUDA sources, "0" CPU only, "auto"/unset: CUDA when
                        torch is a CUDA build and nvcc is found (no GPU needed).
  TORCH_CUDA_ARCH_LIST  archs to build (default "9.0+PTX": sm_90 plus a PTX target).
  MAX_JOBS              parallel compile jobs (ninja).
  CUDA_HOME             toolkit root; defaults to /usr/local/cuda when nvcc is there.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

# torch guesses the toolkit from PATH; nvcc usually is not on it, so point at the
# standard location before cpp_extension reads the environment.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def _want_cuda():
    flag = os.environ.get("FASTAR_CUDA", "auto").strip().lower()
    nvcc = None
    if cpp_extension.CUDA_HOME:
        cand = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        nvcc = cand if os.path.exists(cand) else None
    nvcc = nvcc or shutil.which("nvcc")
    if flag in ("0", "false", "no", "off", "cpu"):
        return False
    if flag in ("1", "true", "yes", "on", "cuda"):
        if torch.version.cuda is None:
            sys.exit("FASTAR_CUDA=1 but this torch is a CPU-only build; install a CUDA build of torch "
                     "or set FASTAR_CUDA=0")
        if nvcc is None:
            sys.exit("FASTAR_CUDA=1 but nvcc was not found; set CUDA_HOME to the CUDA toolkit root")
        return True
    if flag not in ("", "auto"):
        sys.exit(f"FASTAR_CUDA must be 0, 1 or auto, got {flag!r}")
    return torch.version.cuda is not None and nvcc is not None


def _extension():
    with_cuda = _want_cuda()
    sources = ["csrc/fastar.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(HERE, "csrc")]
    # CUDA 13 wheels keep the toolkit headers torch includes (cusparse.h, ...) here.
    for p in sys.path:
        cu13 = os.path.join(p, "nvidia", "cu13", "include")
        if os.path.isdir(cu13):
            include_dirs.append(cu13)
            break
    # -fopenmp: at::parallel_for is a header template; without the flag its `omp parallel`
    # compiles away and every CPU kernel runs on one thread whatever torch.get_num_threads() says.
    cxx = ["-O3", "-DFASTAR_PYTHON_MODULE", "-fopenmp"]
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    archs = []
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        cxx.append("-DFASTAR_WITH_CUDA")
        nvcc.append("-DFASTAR_WITH_CUDA")
        archs = os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", " ").split()
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx, "nvcc": nvcc}
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx}
    _write_build_config(with_cuda, archs)
    print(f"fastar: building _C with CUDA={'yes' if with_cuda else 'no'}"
          + (f", archs {archs}" if archs else ""), flush=True)
    return ext_cls("fastar._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
                   extra_link_args=["-fopenmp"])


def _write_build_config(with_cuda, archs):
    path = os.path.join(HERE, "fastar", "_build_config.py")
    text = ("# Written by setup.py at build time; do not edit.\n"
            f"WITH_CUDA = {with_cuda!r}\n"
            f"CUDA_ARCHS = {archs!r}\n"
            f"BUILT_WITH_TORCH = {torch.__version__!r}\n"
            f"BUILT_WITH_CUDA = {torch.version.cuda if with_cuda else None!r}\n")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# Name, version, packages and the console script live in pyproject.toml.
setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
