"""gpt2hub's build: pyproject.toml says everything but the one optional C library, gpt2hub/_native.c.

That library (loaded with ctypes by gpt2hub/native.py, not imported) holds batch-1 decoding's matrix-vector kernels
for x86-64 CPUs with AVX512. It is optional: where it does not compile (no C compiler, one without AVX512-BF16 or
OpenMP, another OS or CPU architecture), the install goes on without it and gpt2hub runs oneDNN instead.
"""

import platform
import sys

from setuptools import Extension, setup

FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"]
native = Extension("gpt2hub._native", ["gpt2hub/_native.c"], extra_compile_args=FLAGS, extra_link_args=["-fopenmp"],
                   libraries=["m"], optional=True)
x86_linux = sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")
setup(ext_modules=[native] if x86_linux else [])
