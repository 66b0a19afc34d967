# Kept only for legacy tools that call `setup.py` directly; all metadata lives in pyproject.toml.
from setuptools import setup
setup()
