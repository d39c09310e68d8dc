"""Serving logic behind the Triton model.py files, importable and testable without a server."""
