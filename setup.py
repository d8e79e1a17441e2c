"""configs/ (train.py's primary config folder, the one copy of every yaml) ships inside the package as
``detlib.configs``, so an installed detlib composes its own configs (Hydra's ``pkg://detlib.configs``).
pyproject.toml cannot map one folder to a subpackage beside ``packages.find``; this is the only reason for this file."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["detlib", "detlib.*"]), "detlib.configs"],
      package_dir={"detlib.configs": "configs"})
