"""Triton kernels, one op a file, each with its plain-torch reference in ref.py."""
