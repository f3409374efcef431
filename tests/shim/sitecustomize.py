"""Test environment only (on PYTHONPATH for the tests' subprocesses): see torchvision_shim.py."""
import torchvision_shim  # noqa: F401
