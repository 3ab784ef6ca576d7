"""Expert x data parallelism on torch.distributed, applied to a model from outside.

    mesh = init_parallel(ep=2)          # under torchrun; gloo on CPU, NCCL on CUDA
    model = parallelize(Transformer(config), mesh)
    loss.backward(); sync_gradients(model, mesh); optimizer.step()

`moekit train` joins and leaves the process group with `with training_mesh(ep, timeout_s)
as mesh:` and passes the mesh to the Trainer. See docs/scaling.md for what is global under expert parallelism, the gradient groups,
checkpoints, and the communication planner (`moekit bench comm`).
"""

from .all_to_all import ExpertParallelExperts, exchange_seconds
from .apply import (
    all_reduce_router_loads,
    clip_grad_norm,
    data_parallel,
    expert_parameters,
    parallelize,
    sync_gradients,
)
from .gather import consolidated, full_optimizer_tensors, shard_optimizer_tensors
from .mesh import (
    ParallelMesh,
    backend_for,
    build_mesh,
    default_device,
    init_parallel,
    launched_by_torchrun,
    mesh_from_device_mesh,
    training_mesh,
)
from .planner import GroupPlanner

__all__ = [
    "ExpertParallelExperts",
    "GroupPlanner",
    "ParallelMesh",
    "all_reduce_router_loads",
    "backend_for",
    "build_mesh",
    "clip_grad_norm",
    "consolidated",
    "data_parallel",
    "default_device",
    "exchange_seconds",
    "expert_parameters",
    "full_optimizer_tensors",
    "init_parallel",
    "launched_by_torchrun",
    "mesh_from_device_mesh",
    "parallelize",
    "shard_optimizer_tensors",
    "sync_gradients",
    "training_mesh",
]
