"""The non-language tasks: classic, hierarchical and multi-gate MoEs and the vision MoE.

    data = load_digits_data()                        # scikit-learn's bundled digits
    model = MoEClassifier(64, 10, router="dense")    # moekit.models.classic
    final, seconds = train_task(model, data, TrainConfig(steps=400, batch_size=64),
                                run_dir, loss_fn=F.cross_entropy,
                                metrics_fn=classification_metrics)

`moekit train --task NAME` runs them from the command line (tasks/cli.py); docs/families.md
describes the models and the measured results.
"""

from .data import (
    TaskData,
    load_digits_data,
    load_mnist_5k,
    load_text_domains,
    mmoe_synthetic,
)
from .loop import (
    classification_metrics,
    evaluate,
    regression_loss,
    regression_metrics,
    specialisation,
    train_task,
)

__all__ = [
    "TaskData",
    "classification_metrics",
    "evaluate",
    "load_digits_data",
    "load_mnist_5k",
    "load_text_domains",
    "mmoe_synthetic",
    "regression_loss",
    "regression_metrics",
    "specialisation",
    "train_task",
]
