"""spava-plan: a declarative planner/compiler for Spava sequence-parallel approximate attention.

The core package holds the config schemas, the Plan format and the error family; the planner,
codegen and runtime stages install as its subpackages (spava_plan.planner, .codegen, .runtime), and
the entry points that wire them together live in spava_plan.entry (the commands, the Session, the
plan store) and spava_plan.server (spava-serve). docs/architecture.md draws the layers.
"""
from .errors import SpavaError
from .plan import Plan
from .plan_load import load_plan

__all__ = ["Plan", "SpavaError", "load_plan"]
__version__ = "0.1.0"
