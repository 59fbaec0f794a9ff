"""spava-plan: a declarative planner/compiler for Spava sequence-parallel approximate attention.

The core package holds the config schemas, the Plan format and the error family; the planner,
codegen and runtime stages install as its subpackages (spava_plan.planner, .codegen, .runtime).
"""
from .errors import SpavaError
from .plan import Plan
from .plan_load import load_plan

__all__ = ["Plan", "SpavaError", "load_plan"]
__version__ = "0.1.0"
