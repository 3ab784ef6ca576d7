"""Training: the Trainer, checkpoints, the learning-rate schedule, metrics, MoE-vs-dense.

data = prepare_run_data("runs/tiny")                    # default corpus, tokenised once
trainer = Trainer(presets.tiny(), TrainConfig(steps=300), "runs/tiny", data=data)
result = trainer.train()                               # metrics.jsonl, checkpoint/
"""

from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .builder import Job, build_job
from .compare import Comparison, compare, format_table, steps_to_reach
from .config import TrainConfig
from .data import RunData, prepare_run_data, write_prepared
from .evaluation import evaluate
from .inference import EvalResult, TextPiece, evaluate_run, generate_text
from .jobs import default_out_dir, resume_job, train_from, train_one
from .metrics import MetricsLog, read_metrics
from .run import DistributedRun, LocalRun, Run, run_on
from .rundir import load_trained_model, read_run_config, run_configs
from .schedule import lr_at
from .seeds import SeedsSummary, compare_seeds, format_summary
from .step import optimizer_step, train_record
from .trainer import Trainer, TrainResult

__all__ = [
    "CheckpointError",
    "Comparison",
    "DistributedRun",
    "EvalResult",
    "Job",
    "LocalRun",
    "MetricsLog",
    "Run",
    "RunData",
    "SeedsSummary",
    "TextPiece",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_job",
    "compare",
    "compare_seeds",
    "default_out_dir",
    "evaluate",
    "evaluate_run",
    "format_summary",
    "format_table",
    "generate_text",
    "load_checkpoint",
    "load_trained_model",
    "lr_at",
    "optimizer_step",
    "prepare_run_data",
    "read_metrics",
    "read_run_config",
    "resume_job",
    "run_configs",
    "run_on",
    "save_checkpoint",
    "steps_to_reach",
    "train_from",
    "train_one",
    "train_record",
    "write_prepared",
]
