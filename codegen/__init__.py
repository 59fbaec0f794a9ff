"""Codegen: renders a plan's Triton kernels from the Jinja2 templates in codegen/templates.

Pure text rendering: importing this package needs neither torch nor triton.
"""
from .render import cache_key, render_kernels, render_source

__all__ = ["cache_key", "render_kernels", "render_source"]
