"""Builds the optional LAPACK fold extension (ctxlr/linalg/_lapack_fold.cc).

Everything else about the package is in pyproject.toml. The extension is
C++ against the XLA FFI headers that jaxlib ships; `optional=True`: without
a compiler the package still installs and calibration folds densely
(`ctxlr.linalg.lapack_fold.available()` says which).
"""

import os

import setuptools


def _extensions() -> list[setuptools.Extension]:
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top
  except ImportError:  # a build environment without jaxlib: no extension
    return []
  return [
      setuptools.Extension(
          'ctxlr.linalg._lapack_fold',
          sources=['ctxlr/linalg/_lapack_fold.cc'],
          include_dirs=[
              os.path.join(os.path.dirname(jaxlib.__file__), 'include')
          ],
          language='c++',
          extra_compile_args=['-std=c++17', '-O2', '-fvisibility=hidden'],
          optional=True,
      )
  ]


setuptools.setup(ext_modules=_extensions())
