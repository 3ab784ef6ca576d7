"""build_job: the one way a job prepares its data and builds its Trainer.

`moekit train` (one model, --init-from, the comparison), surgery's new runs, Branch-Train-
MiX and fine-tuning differ in what they pass (a config or a model, a data source or data
already prepared, weights to start from, a mesh) and in what they do with the Trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..data import CorpusConfig
from ..models import ModelConfig, Transformer
from ..parallel import ParallelMesh
from .config import TrainConfig
from .data import RunData, prepare_run_data
from .trainer import Trainer


@dataclass
class Job:
    """A job ready to train: its data, and the Trainer holding the model."""

    data: RunData
    trainer: Trainer

    @property
    def model(self) -> nn.Module:
        return self.trainer.model


def build_job(
    model: ModelConfig | Transformer,
    train_config: TrainConfig,
    run_dir: str | Path,
    *,
    data: str | Path | None = None,
    prepared: RunData | None = None,
    data_source: str | dict | None = None,
    corpus_config: CorpusConfig | None = None,
    init_weights: nn.Module | None = None,
    mesh: ParallelMesh | None = None,
    resume: bool = False,
    show_progress: bool = True,
    **trainer_options,
) -> Job:
    """Prepare a run's data and build its Trainer (nothing trained yet).

    Args:
        model: a config (the Trainer builds a fresh model from the train seed) or a model
            to train as it is (a loaded run, a fine-tuning base).
        train_config: the training settings.
        run_dir: the run directory.
        data: the source prepare_run_data tokenises into run_dir (None = the default
            corpus); ignored when `prepared` is given.
        prepared: data already prepared (a domain's streams, finetune's conversations).
        data_source: recorded in config.json; None records str(data) (None for the
            default corpus).
        corpus_config: a smaller default corpus.
        init_weights: copied into the freshly built model (whose initialisation still
            draws from the seeded generator, as a run from scratch does).
        mesh, resume, show_progress: as Trainer's.
        trainer_options: label, compile_decision, replay (Trainer's).
    Returns:
        The Job: its data and Trainer.
    """
    config = model if isinstance(model, ModelConfig) else model.config
    if prepared is None:
        prepared = prepare_run_data(
            run_dir,
            data=data,
            vocab_size=config.vocab_size,
            corpus_config=corpus_config,
            mesh=mesh,
        )
    if data_source is None and data is not None:
        data_source = str(data)
    trainer = Trainer(
        config,
        train_config,
        run_dir,
        data=prepared,
        model=None if isinstance(model, ModelConfig) else model,
        mesh=mesh,
        resume=resume,
        show_progress=show_progress,
        data_source=data_source,
        **trainer_options,
    )
    if init_weights is not None:
        trainer.model.load_state_dict(init_weights.state_dict(), strict=True)
    return Job(prepared, trainer)
