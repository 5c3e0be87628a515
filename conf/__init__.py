"""Hydra configuration tree of codetr, importable as ``codetr.conf`` (``pkg://codetr.conf``).

The YAML files live in the repository's top-level ``conf/`` directory; packaging maps that directory to the
``codetr.conf`` package (see ``setup.py``) so that the entry points find it from any working directory, for
editable and regular installs alike.
"""
