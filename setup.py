"""Build settings for the Cython kernels; everything else is in pyproject.toml.

SMIRROR_DEBUG=1 builds with line tracing (for coverage / profiling);
SMIRROR_ONLY=_checksum,_journal builds a subset (kernel development only).
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("SMIRROR_DEBUG") == "1"
VENDOR_XXHASH = "cext/vendor/xxhash"

compile_args = ["-O3", "-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
macros = [("XXH_INLINE_ALL", None)]
if DEBUG:
    compile_args = ["-O0", "-g", "-Wall"]
    macros += [("CYTHON_TRACE_NOGIL", "1")]


def kernel(name, sources=()):
    return Extension(
        f"smirror.kernels.{name}",
        [f"cext/smirror/kernels/{name}.pyx", *sources],
        include_dirs=["cext/smirror/kernels", VENDOR_XXHASH],
        define_macros=macros,
        extra_compile_args=compile_args,
    )


extensions = [
    kernel("_checksum"),  # rolling weak + strong block hashes, delta search
    kernel("_journal"),   # op frames: encode / validate / decode
    kernel("_memqueue"),  # byte-bounded FIFO with disk spill segments
]
only = os.environ.get("SMIRROR_ONLY")
if only:
    wanted = set(only.split(","))
    extensions = [e for e in extensions if e.name.split(".")[-1] in wanted]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["cext"],   # finds cext/smirror/kernels/*.pxd for "smirror.kernels._name"
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "linetrace": DEBUG,
        },
    ),
)
