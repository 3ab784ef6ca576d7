"""moekit: sparse Mixture-of-Experts layers and models in PyTorch."""

from .config import ROUTERS, MoEConfig
from .experts import MLP, GroupedExperts, ModuleExperts
from .moe import MoE, MoEOutput, MoEStats, update_router_biases

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "ROUTERS",
    "GroupedExperts",
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "MoEStats",
    "ModuleExperts",
    "update_router_biases",
    "__version__",
]
