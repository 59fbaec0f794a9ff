"""Codegen: renders a plan's Triton kernels from the template files in codegen/templates.

Pure text rendering: importing this package needs neither torch nor triton.
"""
from .render import render_kernels, render_source

__all__ = ["render_kernels", "render_source"]
