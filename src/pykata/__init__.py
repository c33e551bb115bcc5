"""pykata: Kata Containers in Python. Every pod runs in its own lightweight VM."""

__version__ = "0.1.0"
