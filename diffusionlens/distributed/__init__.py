"""Fan sweeps, seed searches and activation harvests out over a Ray cluster (the `[distributed]` extra).

`ModelPool` starts one Ray actor per worker, each loading the model once; work items go to whichever
worker is free, and an item whose worker dies is retried on a fresh one a bounded number of times
(then `WorkItemFailed` names it). Ray is imported only when a pool starts.
"""

from diffusionlens.distributed.pool import ModelPool, WorkItemFailed, connect, require_ray
from diffusionlens.distributed.sweeps import (
    generate_over_seeds_distributed,
    harvest_distributed,
    run_sweep_spec_distributed,
)

__all__ = [
    "ModelPool",
    "WorkItemFailed",
    "connect",
    "generate_over_seeds_distributed",
    "harvest_distributed",
    "require_ray",
    "run_sweep_spec_distributed",
]
