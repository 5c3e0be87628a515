"""Packaging shim: everything is declared in pyproject.toml except the mapping of the top-level ``conf/``
directory (Hydra configs) onto the ``codetr.conf`` package, which pyproject's package discovery cannot express."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages("src"), "codetr.conf"],
    package_dir={"": "src", "codetr.conf": "conf"},
    package_data={"codetr.conf": ["*.yaml", "**/*.yaml"], "codetr": ["py.typed", "models/transformer/csrc/*.cpp"]},
)
