"""Tunery worker: claims jobs from a Tunery server over HTTP and trains models with PyTorch."""

__version__ = "0.1.0"
