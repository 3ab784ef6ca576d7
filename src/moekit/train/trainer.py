"""The training loop: AdamW, warmup + cosine, clipping, aux losses, bias updates, evals.

One Trainer trains one model in one run directory:
    RUN/config.json          model and train config, data source, versions
    RUN/tokenizer.json, RUN/data/   the token streams (see train/data.py)
    RUN/metrics.jsonl        one line per step and per evaluation
    RUN/routing.jsonl        per-layer routing statistics of MoE runs (train/metrics.py)
    RUN/checkpoint/          weights and trainer state (see train/checkpoint.py)
Everything the next step depends on (weights, AdamW moments, step, loader position,
torch RNG) is in the checkpoint, so a resumed run ends with bit-identical weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import torch
from torch import Tensor

from .. import __version__
from ..models import ModelConfig, Transformer
from ..models.lora import LoRAConfig, add_lora, merge_lora
from ..parallel import ParallelMesh, exchange_seconds
from .checkpoint import checkpoint_dir, load_checkpoint
from .config import (
    TrainConfig,
    model_config_from_dict,
    model_config_to_dict,
    train_config_from_dict,
    trainable_patterns,
)
from .data import RunData
from .metrics import MetricsLog, RoutingLog, read_metrics
from .run import run_on
from .step import optimizer_step, train_record
from .tensorboard import TensorBoardLog

CONFIG_FILE = "config.json"
RUN_FORMAT = 1


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports.

    evals: (step, validation loss) pairs in step order. tokens_per_s: training tokens
    over training time (evaluation and checkpoints excluded). step_seconds: the wall time
    of each training step in order (the first one holds a compile, when there is one).
    """

    steps: int
    final_val_loss: float
    tokens_per_s: float
    train_seconds: float
    evals: list[tuple[int, float]] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)


class Trainer:
    """Train a Transformer on a run's data, with checkpoints and a metrics log.

    Args:
        model_config: the model to build.
        train_config: the training settings.
        run_dir: the run directory (created if needed).
        data: the run's tokenizer and streams (prepare_run_data), or other data with
            RunData's loader, eval_windows and domain_names (finetune's instructions).
        model: the model to train (a fine-tuning base, say); None builds a fresh one from
            model_config.
        mesh: the ranks to train on (parallel.training_mesh under torchrun), or None for
            this process alone. Rank 0 writes the run directory, rank r > 0 logs its local
            metrics in RUN/rank{r}/ (docs/scaling.md).
        resume: continue from run_dir's checkpoint (its config must equal the given one).
        show_progress: draw a tqdm progress bar on stderr.
        data_source: recorded in config.json (None = the default corpus).
        routing_stats_every: steps per routing.jsonl record (0 = no routing statistics).
    """

    def __init__(
        self,
        model_config: ModelConfig,
        train_config: TrainConfig,
        run_dir: str | Path,
        *,
        data: RunData,
        model: Transformer | None = None,
        mesh: ParallelMesh | None = None,
        resume: bool = False,
        show_progress: bool = True,
        data_source: str | dict | None = None,
        routing_stats_every: int = 10,
    ):
        self.model_config, self.config = model_config, train_config
        self.run_dir = Path(run_dir)
        if data.tokenizer.vocab_size > model_config.vocab_size:
            raise ValueError(
                f"the tokenizer has {data.tokenizer.vocab_size} tokens but the model's vocab_size "
                f"is {model_config.vocab_size}"
            )
        torch.manual_seed(train_config.seed)
        self.run = run_on(mesh)
        if model is not None and model.config != model_config:
            raise ValueError("the given model was not built from model_config")
        self.model = self.run.prepare(model) if model is not None else self.run.build(model_config)
        # The training forward, compiled when asked; evaluation and saving use the model.
        self.forward = torch.compile(self.model) if train_config.compile else self.model
        self.is_main = self.run.is_main
        self.show_progress = show_progress and self.is_main
        self.optimizer = build_optimizer(self.model, train_config)
        self.loader = data.loader(train_config)
        windows = data.eval_windows(train_config)
        self.eval_batches = [batch[:2] for batch in windows]
        log_dir = self.run_dir if self.is_main else self.run_dir / f"rank{self.run.rank}"
        self.metrics = MetricsLog(log_dir)
        self.routing = RoutingLog(log_dir, routing_stats_every if model_config.moe else 0)
        self.eval_domains = (data.domain_names, [domains_BL for *_, domains_BL in windows])
        self.step, self.train_seconds, self.exchange_seconds = 0, 0.0, 0.0
        self._start(resume, data_source)
        # After _start: a resumed run drops the events past its checkpoint's step.
        self.tensorboard = None
        if train_config.tensorboard:
            self.tensorboard = TensorBoardLog(log_dir, purge_step=self.step + 1 if resume else None)

    def _start(self, resume: bool, data_source: str | dict | None) -> None:
        run_config = {
            "format": RUN_FORMAT,
            "moekit_version": __version__,
            "model": model_config_to_dict(self.model_config),
            "train": _asdict(self.config),
            "data": data_source,
        }
        if resume:
            saved = read_run_config(self.run_dir)
            # Through the dataclasses and back: a run saved before a setting existed
            # holds its default, not a different config.
            saved_model = model_config_to_dict(model_config_from_dict(saved["model"]))
            saved_train = _asdict(train_config_from_dict(saved["train"]))
            if saved_model != run_config["model"] or saved_train != run_config["train"]:
                raise ValueError(
                    f"--resume: the config differs from the one saved in {str(self.run_dir)!r}"
                )
            state = self.run.load(self.run_dir, self.model, self.optimizer)
            self.step, self.train_seconds = state["step"], state["train_seconds"]
            self.loader.load_state_dict(state["loader"])
            self.metrics.truncate_after(self.step)
            self.routing.truncate_after(self.step)
            return
        if checkpoint_dir(self.run_dir) is not None:
            raise ValueError(
                f"{str(self.run_dir)!r} already holds a trained run; resume it or choose another run directory"
            )
        self.metrics.path.parent.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            (self.run_dir / CONFIG_FILE).write_text(
                json.dumps(run_config, indent=1), encoding="utf-8"
            )
        self.metrics.path.unlink(missing_ok=True)
        self.routing.path.unlink(missing_ok=True)

    def train(self, stop_at: int | None = None) -> TrainResult:
        """Train to config.steps (or stop_at), evaluating and checkpointing on the way.

        Ctrl-C finishes the current step, saves a checkpoint, then raises KeyboardInterrupt.

        Args:
            stop_at: stop (with a checkpoint) after this many steps, as an interruption would.
        Returns:
            The TrainResult.
        """
        cfg = self.config
        last = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        if self.step == 0:
            self.evaluate_and_log()
        with (
            progress_bar(cfg.steps, self.step, self.show_progress) as bar,
            _deferred_interrupt() as interrupt,
        ):
            while self.step < last:
                record = self.train_step()
                if self.step == 1:  # under a mesh: the largest rank's bytes, once
                    self.run.report_memory(self.model, self.optimizer, self.run_dir)
                bar.update(1)
                bar.set_postfix_str(_postfix(record))
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    self.evaluate_and_log()
                if self.run.any(interrupt.is_set()):  # every rank saves, or none does
                    self.save()
                    raise KeyboardInterrupt
                if self.step % cfg.checkpoint_every == 0 and self.step < last:
                    self.save()
        self.save()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.exchange_seconds and self.is_main:
            share = self.exchange_seconds / max(self.train_seconds, 1e-9)
            print(
                f"all-to-all on rank 0: {self.exchange_seconds:.1f} s of "
                f"{self.train_seconds:.1f} s of training steps ({share:.0%}); the rest is compute",
                flush=True,
            )
        return self.result()

    def train_step(self) -> dict:
        """One optimizer step on the next batch; appends and returns its metrics record."""
        start = time.perf_counter()
        inputs_BL, targets_BL = self.loader.next_batch()
        num_tokens = inputs_BL.numel()
        inputs_BL, targets_BL = self.run.shard(inputs_BL, targets_BL)
        with self._autocast():
            out = self.forward(inputs_BL, targets_BL)
        (out.loss + out.aux_loss + out.mtp_loss).backward()  # mtp_loss 0 without MTP modules
        lr, grad_norm = optimizer_step(self.model, self.optimizer, self.config, self.step, self.run)
        self.step += 1
        self.routing.add(out.stats)
        if self.step % max(self.routing.every, 1) == 0 or self.step == self.config.steps:
            routing_record = self.routing.flush(self.step)
            if self.tensorboard is not None:
                self.tensorboard.routing(routing_record)
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        record = train_record(
            step=self.step,
            loss=self.run.mean(out.loss.item()),
            aux_loss=self.run.mean(out.aux_loss.item()),
            lr=lr,
            grad_norm=grad_norm,
            throughput=("tokens_per_s", num_tokens / seconds),
            stats=out.stats,
        )
        if self.model_config.mtp_depth:  # weighted, as trained; not in loss or aux_loss
            record["mtp_loss"] = self.run.mean(out.mtp_loss.item())
        exchanged = exchange_seconds(self.model)
        if exchanged:  # expert parallelism: this rank's all-to-all time within the step
            record["all_to_all_s"] = exchanged
            self.exchange_seconds += exchanged
        self._log(record)
        return record

    def evaluate_and_log(self) -> float:
        """Validation loss on the fixed eval batches, appended to the metrics log (and the
        domain x expert counts of those batches to the routing log)."""
        names, domains_per_batch = self.eval_domains
        num_experts = self.model_config.moe.num_experts if self.model_config.moe else 0
        batches = [self.run.shard(*batch) for batch in self.eval_batches]
        observe = None
        if self.run.world_size == 1:  # ranks see a part of each batch: no domain counts
            observe = self.routing.eval_observer(domains_per_batch, len(names), num_experts)
        with self._autocast():
            loss = self.run.mean(evaluate(self.model, batches, observe=observe))
        self.routing.write_eval(self.step, names)
        self._log(
            {"split": "val", "step": self.step, "loss": loss, "perplexity": _perplexity(loss)}
        )
        return loss

    def _log(self, record: dict) -> None:
        """A metrics record into metrics.jsonl (and TensorBoard, when on)."""
        self.metrics.append(record)
        if self.tensorboard is not None:
            self.tensorboard.record(record)

    def save(self) -> Path:
        """Checkpoint the current step into run_dir/checkpoint/."""
        state = {
            "step": self.step,
            "train_seconds": self.train_seconds,
            "loader": self.loader.state_dict(),
            "config": read_run_config(self.run_dir),
        }
        return self.run.save(self.run_dir, self.model, self.optimizer, state)

    def result(self) -> TrainResult:
        """The run's result so far, read back from the metrics log."""
        evals = [(r["step"], r["loss"]) for r in read_metrics(self.run_dir, split="val")]
        tokens_per_step = self.config.batch_size * self.config.seq_len
        step_seconds = [
            tokens_per_step / r["tokens_per_s"] for r in read_metrics(self.run_dir, split="train")
        ]
        tokens = self.step * tokens_per_step
        return TrainResult(
            steps=self.step,
            final_val_loss=evals[-1][1] if evals else math.nan,
            tokens_per_s=tokens / self.train_seconds if self.train_seconds else math.nan,
            train_seconds=self.train_seconds,
            evals=evals,
            step_seconds=step_seconds,
        )

    def _autocast(self):
        enabled = self.config.dtype == "bfloat16"
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=enabled)


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and expert weights (ndim >= 2) only.

    Norm gains and biases are not decayed: shrinking them towards 0 is not a prior anyone
    wants (nanoGPT, LLaMA recipes). The learning rate is set every step by the schedule.
    fused=True: one kernel per parameter group instead of a chain of foreach ops; on CPU
    the step over the tiny MoE's 4 M parameters drops from about 23 ms to 4 ms.
    With config.trainable set, the other parameters are frozen (requires_grad False).
    """
    params = _trainable(model, config.trainable)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # Sharded (DTensor) parameters take the plain per-parameter loop.
    fused = not any(hasattr(p, "device_mesh") for p in params)
    return torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        fused=fused or None,
        foreach=None if fused else False,
    )


def _trainable(model: torch.nn.Module, trainable: str | None) -> list[torch.nn.Parameter]:
    """The parameters matching the trainable patterns (all when None); freezes the rest."""
    if trainable is None:
        return list(model.parameters())
    patterns = trainable_patterns(trainable)
    unmatched = [p for p in patterns if not any(fnmatch(n, p) for n, _ in model.named_parameters())]
    if unmatched:
        raise ValueError(f"trainable patterns {unmatched} match no parameter of the model")
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(fnmatch(name, p) for p in patterns))
        if param.requires_grad:
            params.append(param)
    return params


def fixed_eval_batches(data: RunData, config: TrainConfig) -> list[tuple[Tensor, Tensor]]:
    """The (inputs_BL, targets_BL) batches every evaluation uses (RunData.eval_windows)."""
    return [batch[:2] for batch in data.eval_windows(config)]


def fixed_eval_domains(data: RunData, config: TrainConfig) -> list[Tensor]:
    """The (B, L) domain ids of the target tokens of fixed_eval_batches."""
    return [domains_BL for *_, domains_BL in data.eval_windows(config)]


@torch.no_grad()
def evaluate(model: Transformer, batches, observe=None) -> float:
    """Mean next-token cross entropy over the batches' target tokens (aux losses excluded).

    Args:
        model: the model; put in eval mode for the call and restored afterwards.
        batches: iterable of (inputs_BL, targets_BL).
        observe: None, or observe(i, output) called with batch i's ModelOutput, which then
            carries expert_ids (routing statistics).
    Returns:
        The loss in nats per token.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, (inputs_BL, targets_BL) in enumerate(batches):
        out = model(inputs_BL, targets_BL, return_expert_ids=observe is not None)
        if observe is not None:
            observe(i, out)
        # Weighted by the tokens the loss counts (fine-tuning ignores prompts and padding).
        num_targets = int((targets_BL != -100).sum())
        if num_targets:
            total += out.loss.item() * num_targets
            count += num_targets
    model.train(was_training)
    if count == 0:
        raise ValueError("no validation batches: the validation split is shorter than one sequence")
    return total / count


def read_run_config(run_dir: str | Path) -> dict:
    """The run's config.json; ValueError when missing, unreadable or of another format."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{str(run_dir)!r} is not a moekit run directory ({CONFIG_FILE}: {error})"
        ) from None
    if config.get("format") != RUN_FORMAT:
        raise ValueError(
            f"run {str(run_dir)!r} has format {config.get('format')!r} (moekit "
            f"{config.get('moekit_version', '?')}); moekit {__version__} reads format {RUN_FORMAT}"
        )
    return config


def run_configs(run_dir: str | Path) -> tuple[ModelConfig, TrainConfig, str | None]:
    """The model config, train config and data source saved in a run directory."""
    saved = read_run_config(run_dir)
    return (
        model_config_from_dict(saved["model"]),
        train_config_from_dict(saved["train"]),
        saved["data"],
    )


def load_trained_model(run_dir: str | Path) -> Transformer:
    """The run's model with its checkpoint's weights, in eval mode.

    A LoRA fine-tuning run (its config.json's data names a "lora" rank) comes back with
    the adapters merged into the weights.
    """
    model_config, _, source = run_configs(run_dir)
    model = Transformer(model_config)
    lora = source.get("lora") if isinstance(source, dict) else None
    if lora and lora.get("rank"):
        add_lora(model, LoRAConfig(**lora))
    load_checkpoint(run_dir, model)
    return (merge_lora(model) if lora and lora.get("rank") else model).eval()


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: an untrained loss must not overflow to inf


def _postfix(record: dict) -> str:
    return (
        f"loss {record['loss']:.3f} aux {record['aux_loss']:.4f} "
        f"drop {record['dropped_fraction']:.1%} {record['tokens_per_s']:,.0f} tok/s"
    )


def _asdict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


@contextlib.contextmanager
def progress_bar(total: int, initial: int, enabled: bool):
    """The training progress bar (tqdm, in steps), shared by every trainer in moekit."""
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        unit="step",
        dynamic_ncols=True,
    )
    try:
        yield bar
    finally:
        bar.close()


@contextlib.contextmanager
def _deferred_interrupt():
    """Turn the first Ctrl-C into a flag checked between steps (a second one stops at once).

    A KeyboardInterrupt raised inside optimizer.step() could leave half-updated weights;
    deferring it to the step boundary keeps the saved checkpoint consistent.
    """
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted  # signal handlers can only be set from the main thread
        return

    def handler(signum, frame):
        interrupted.set()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)
