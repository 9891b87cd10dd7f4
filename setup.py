"""Thin compatibility shim; the build is defined in ``pyproject.toml``.

rasd builds its native core (``rasd._core``) with scikit-build-core, which drives CMake and ninja
(see ``CMakeLists.txt``). There is no setuptools build: this file only exists so that tools and habits
that still call ``python setup.py ...`` get a clear pointer instead of a confusing failure.

    pip install .                                  # build and install
    pip install --no-build-isolation -e .          # developer install; reruns are incremental
"""

import sys

if __name__ == "__main__":
    sys.exit(
        "rasd is built by scikit-build-core (CMake + ninja) from pyproject.toml.\n"
        "Use `pip install .` or, for development, `pip install --no-build-isolation -e .`."
    )
