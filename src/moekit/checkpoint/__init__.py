"""Checkpoints: safetensors (or torch.distributed.checkpoint shards) for tensors, JSON for
everything else, never pickle.

A run directory holds `checkpoint/` in one of two layouts. Consolidated (one process, and
the default under torchrun without FSDP; consolidated.py):
    model.safetensors      the weights (tied embeddings stored once)
    optimizer.safetensors  AdamW moments and step counts, keyed by parameter name
    trainer_state.json     format, versions, step, data loader state, RNG state, config,
                           and the SHA-256 of both tensor files
Sharded (the default under --parallel.fsdp true; sharded.py):
    shards/shard-NNNNN-model-00001-of-00001.safetensors
                           what rank NNNNN - 1 wrote: its chunks of the weights and AdamW
                           state in one-process coordinates (DCP's safetensors storage)
    trainer_state.json     the same state, "tensors": "sharded", and every shard's SHA-256
The files are written into `checkpoint.tmp/` (every rank its own shards), which then
replaces `checkpoint/` by rename, so a crash mid-save leaves the previous checkpoint whole
(folder.py). Loading checks the format and the hashes first (load.py, hashing.py): a
truncated or edited file is one clear CheckpointError, raised before anything is written.
Either layout loads at any layout; gathered.py saves and loads a model spread over ranks.

The package calls parallel/ for what is parallel (gathering expert slices and FSDP shards,
the DTensor view of a rank's tensors), never the other way round.
"""

from .consolidated import (
    load_optimizer_tensors,
    optimizer_tensors,
    save_checkpoint,
)
from .folder import CHECKPOINT_DIR, OPTIMIZER_FILE, CheckpointError, checkpoint_dir
from .gathered import load_on_mesh, save_on_mesh
from .load import checkpoint_layout, load_checkpoint, read_checkpoint_state, saved_layout
from .sharded import save_sharded_checkpoint

__all__ = [
    "CHECKPOINT_DIR",
    "OPTIMIZER_FILE",
    "CheckpointError",
    "checkpoint_dir",
    "checkpoint_layout",
    "load_checkpoint",
    "load_on_mesh",
    "load_optimizer_tensors",
    "optimizer_tensors",
    "read_checkpoint_state",
    "save_checkpoint",
    "save_on_mesh",
    "save_sharded_checkpoint",
    "saved_layout",
]
