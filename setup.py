"""Build settings for the Cython kernels and the FUSE binding; everything
else is in pyproject.toml.

SMIRROR_DEBUG=1 builds with line tracing (for coverage / profiling);
SMIRROR_ONLY=_checksum,_journal builds a subset (kernel development only).
"""
import os
import shlex
import subprocess
import sys

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


def fuse_binding():
    """The capture mount's binding of libfuse 3's low-level API, where
    libfuse3's headers are (Debian: libfuse3-dev); without them smirror
    builds without the capture mount, and says so."""
    try:
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], check=True,
                               capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        print("setup.py: libfuse3's headers not found (pkg-config fuse3): building without the "
              "capture mount (Debian: apt-get install libfuse3-dev pkg-config)", file=sys.stderr)
        return []
    macros = [("FUSE_USE_VERSION", "314")]
    try:        # FUSE over io_uring, where liburing is (Debian: liburing-dev)
        flags += " " + subprocess.run(["pkg-config", "--cflags", "--libs", "liburing"], check=True,
                                      capture_output=True, text=True).stdout
        macros.append(("SM_HAVE_URING", "1"))
    except (OSError, subprocess.CalledProcessError):
        print("setup.py: liburing not found (pkg-config liburing): the capture mount serves "
              "requests over /dev/fuse only (Debian: apt-get install liburing-dev)", file=sys.stderr)
    words = shlex.split(flags)
    return [Extension(
        "smirror.capture.mount._fuse",
        ["cext/smirror/mount/_fuse.pyx"],
        include_dirs=["cext/smirror/mount"] + [w[2:] for w in words if w.startswith("-I")],
        libraries=[w[2:] for w in words if w.startswith("-l")],
        library_dirs=[w[2:] for w in words if w.startswith("-L")],
        define_macros=macros,
        extra_compile_args=compile_args,
    )]


extensions = [
    kernel("_checksum"),  # rolling weak + strong block hashes, delta search
    kernel("_journal"),   # op frames: encode / validate / decode
    kernel("_memqueue"),  # byte-bounded FIFO with disk spill segments
    *fuse_binding(),      # the capture mount's FUSE loop
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
