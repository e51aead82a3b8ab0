"""The compiled framer (s2sproxy/core/_framer.c) is optional: a machine without a C
compiler or Python's headers still installs a working proxy, which then frames with
the pure-Python reference in s2sproxy/core/xmlstream.py (README.md "Design notes: the framer").
Everything else is in setup.cfg."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("s2sproxy.core._framer", ["s2sproxy/core/_framer.c"],
                             extra_compile_args=["-O2"], optional=True)])
