"""The default configs; installed as the package ``detlib.configs`` (setup.py), found by Hydra as ``pkg://detlib.configs``."""
