"""The NUMA engine: a placement plan over an unchanged model (plan.py) and the
backend that places shards in node memory and runs them on node pools
(backend.py), on top of the native core in cython_kernels/src/mn_engine.c."""
from .backend import EngineBackend
from .plan import PlacementPlan, make_plan

__all__ = ["EngineBackend", "PlacementPlan", "make_plan"]
