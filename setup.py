"""Metadata is in pyproject.toml (PEP 621). This file says which packages ship: ``configs/`` stays at the top of the
repository and is installed inside the package as ``magicanimate.configs`` (read by ``magicanimate.settings``)."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["magicanimate", "magicanimate.*"]) + ["magicanimate.configs"],
    package_dir={"magicanimate.configs": "configs"},
    package_data={"magicanimate.configs": ["*.yaml"]},
)
