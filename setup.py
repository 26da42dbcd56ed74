"""The optional C token counter (engine/_bpecount.c); everything else is in pyproject.toml.

Without a C compiler the build goes on without it and dsv4 counts tokens with tiktoken.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "engine._bpecount",
            sources=["engine/_bpecount.c"],
            depends=["engine/_bpecount_tables.h"],
            optional=True,
        )
    ]
)
