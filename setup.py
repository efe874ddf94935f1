"""The one thing pyproject.toml cannot say: lgnet's compiled per-frame path.

lgnet/fabric/_fastdma.c is plain CPython C API, built with whatever C compiler the machine has.
It is optional: where no compiler exists the build skips it and lgnet runs on the Python
reference path (fabric/fastpath.py says which one is in use, and why)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("lgnet.fabric._fastdma", ["lgnet/fabric/_fastdma.c"],
                             optional=True, extra_compile_args=["-O2", "-std=c99"])])
