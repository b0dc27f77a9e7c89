"""Build the Cython hot paths in ``fleece/_fast``.

Every ``fleece/_fast/*.pyx`` becomes an extension module. ``FLEECE_NO_EXTENSIONS=1`` at run time
selects the pure-Python twins instead; it does not change what is built here.
"""

from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
FAST = HERE / "fleece" / "_fast"

extensions = [
    Extension(
        f"fleece._fast.{pyx.stem}",
        [str(pyx.relative_to(HERE))],
        include_dirs=[str(FAST.relative_to(HERE))],
        extra_compile_args=["-O3"],
    )
    for pyx in sorted(FAST.glob("*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3", "embedsignature": True},
    ),
)
