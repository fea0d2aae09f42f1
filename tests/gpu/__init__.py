"""CUDA checks (skipped without a GPU); a package so its conftest does not shadow tests/conftest.py."""
