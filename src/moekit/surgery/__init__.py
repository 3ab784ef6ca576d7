"""Model surgery: upcycle a dense model into an MoE, add experts, merge domain experts.

    upcycle(dense_model, moe_config)          experts start as copies of the dense FFN
    add_experts(moe_model, num_new)           more experts, the same output at the start
    merge_dense_models(domain_models, ...)    Branch-Train-MiX: FFNs become the experts

Each is a pure function from models to a new model; `moekit.surgery.runs` turns run
directories into new run directories that `moekit train --resume` continues, and
`moekit.surgery.btx` runs the two Branch-Train-MiX stages and the `moekit merge --demo`
experiment.
"""

from .add_experts import add_experts, add_experts_unsupported, added_experts_config
from .merge import merge_dense_models, merged_config
from .upcycle import upcycle, upcycle_changes_function, upcycle_config

__all__ = [
    "add_experts",
    "add_experts_unsupported",
    "added_experts_config",
    "merge_dense_models",
    "merged_config",
    "upcycle",
    "upcycle_changes_function",
    "upcycle_config",
]
