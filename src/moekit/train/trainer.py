"""The training loop: AdamW, warmup + cosine, clipping, aux losses, bias updates, evals.

One Trainer trains one model in one run directory (its layout: train/rundir.py).
Everything the next step depends on (weights, AdamW moments, step, loader position,
torch RNG) is in the checkpoint, so a resumed run ends with bit-identical weights.

Each Trainer draws from its own torch RNG stream (routers such as noisy_topk and switch
draw noise from torch's global generator): train_until swaps the trainer's state in and
out, so two trainers alternating segment by segment (train/lockstep.py) each train exactly
as they would alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models import ModelConfig, Transformer
from ..parallel import ParallelMesh, exchange_seconds
from .accumulation import forward_backward, micro_batches
from .compiling import PROBE_STEPS, CompileDecision, compile_blocks, uncompile_blocks
from .config import (
    TrainConfig,
    model_config_from_dict,
    model_config_to_dict,
    train_config_from_dict,
)
from .console import deferred_interrupt, discard_line, open_progress_bar, print_line
from .data import RunData
from .evaluation import autocast, evaluate
from .health import RoutingWatch, StepGuard
from .metrics import MetricsLog, RoutingLog, read_metrics
from .optim import build_optimizer
from .run import run_on
from .rundir import checkpoint_dir, new_run_config, read_run_config, write_run_config
from .step import optimizer_step, train_record
from .tensorboard import TensorBoardLog


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
        label: the progress bar's name (e.g. "moe" beside "dense" in a comparison).
        compile_decision: a CompileDecision shared with another trainer (a comparison's
            two models then compile, or not, alike); None makes one from train.compile.
        replay: a routing replay (moekit.traces.training.Replay, with data its
            ReplayData): every training forward takes the trace's experts.
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
        label: str | None = None,
        compile_decision: CompileDecision | None = None,
        replay=None,
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
        # The training forward: the model, whose blocks are compiled in place when
        # train.compile says so (train/compiling.py); evaluation always runs eager.
        self.forward = self.model
        self.compile_decision = compile_decision or CompileDecision(
            train_config.compile, log=print_line if self.run.is_main else discard_line
        )
        self._compiled: bool | None = None
        self.is_main = self.run.is_main
        self.show_progress = show_progress and self.is_main
        self.label, self._bar = label, None
        self.optimizer = build_optimizer(self.model, train_config)
        self.loader = data.loader(train_config)
        if replay is not None:
            self.forward = replay.wrap(self.forward, self.model, self.loader)
        windows = data.eval_windows(train_config)
        self.eval_batches = [batch[:2] for batch in windows]
        log_dir = self.run_dir if self.is_main else self.run_dir / f"rank{self.run.rank}"
        self.metrics = MetricsLog(log_dir)
        self.routing = RoutingLog(log_dir, routing_stats_every if model_config.moe else 0)
        log = print_line if self.is_main else discard_line  # non-finite steps, routing health
        self.guard = StepGuard(train_config.on_nonfinite, self.run, log)
        self.watch = RoutingWatch(model_config.moe.top_k if model_config.moe else 0, self.run, log)
        self.eval_domains = (data.domain_names, [domains_BL for *_, domains_BL in windows])
        self.step, self.train_seconds, self.exchange_seconds = 0, 0.0, 0.0
        # step -> validation loss, and each step's wall time (for per-segment tokens/s);
        # a resumed run reads both back from its metrics log.
        self.val_losses: dict[int, float] = {}
        self.step_seconds: list[float] = []
        self._start(resume, data_source)
        self.saved_step = self.step if resume else None
        # The steps this process took start here ("auto" compile probes only those).
        self._first_step_here = len(self.step_seconds)
        # This trainer's torch RNG stream: seeded (and drawn from by the model's
        # initialisation) or restored from the checkpoint just now.
        self.rng_state, self._rng_held = torch.get_rng_state(), False
        # After _start: a resumed run drops the events past its checkpoint's step.
        self.tensorboard = None
        if train_config.tensorboard:
            self.tensorboard = TensorBoardLog(log_dir, purge_step=self.step + 1 if resume else None)

    def _start(self, resume: bool, data_source: str | dict | None) -> None:
        run_config = new_run_config(
            model=model_config_to_dict(self.model_config),
            train=_asdict(self.config),
            data=data_source,
        )
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
            self._read_back_metrics()
            return
        if checkpoint_dir(self.run_dir) is not None:
            raise ValueError(
                f"{str(self.run_dir)!r} already holds a trained run; resume it or choose another run directory"
            )
        self.metrics.path.parent.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            write_run_config(self.run_dir, run_config)
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
        self.train_until(self.config.steps if stop_at is None else stop_at)
        return self.finish()

    def train_until(self, step: int) -> None:
        """Train up to `step` (at most config.steps) on this trainer's own RNG stream.

        Evaluates at step 0 and every eval_every steps, checkpoints every checkpoint_every
        steps, but writes no checkpoint for reaching `step` itself: finish() writes the
        last one, so a comparison can alternate two trainers segment by segment. Ctrl-C
        finishes the current step, saves a checkpoint, then raises KeyboardInterrupt.
        """
        cfg = self.config
        last = min(step, cfg.steps)
        with self.own_rng(), deferred_interrupt() as interrupt:
            if self.step == 0 and 0 not in self.val_losses:
                self.evaluate_and_log()
            bar = self._progress_bar()
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
                    self.close_progress()
                    raise KeyboardInterrupt
                if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save()

    def finish(self) -> TrainResult:
        """End training where it stands: the last checkpoint (unless the current step is
        saved already), the progress bar and TensorBoard log closed. Returns the result."""
        self.ensure_saved()
        self.close_progress()
        if self._compiled:  # the model leaves the trainer as it came: eager
            uncompile_blocks(self.model)
            self._compiled = None
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

    def ensure_saved(self) -> None:
        """Checkpoint the current step unless the checkpoint holds it already."""
        if self.saved_step != self.step:
            self.save()

    @contextlib.contextmanager
    def own_rng(self):
        """Run the block on this trainer's torch RNG stream; the caller's stream is put back
        afterwards. Nested calls share the outer one's swap."""
        if self._rng_held:
            yield
            return
        outer = torch.get_rng_state()
        torch.set_rng_state(self.rng_state)
        self._rng_held = True
        try:
            yield
        finally:
            self.rng_state = torch.get_rng_state()
            torch.set_rng_state(outer)
            self._rng_held = False

    def _progress_bar(self):
        """The trainer's tqdm bar, open from its first segment until finish()."""
        if self._bar is None:
            self._bar = open_progress_bar(
                self.config.steps, self.step, self.show_progress, desc=self.label
            )
        return self._bar

    def close_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _read_back_metrics(self) -> None:
        """val_losses and step_seconds of the steps a resumed run already took."""
        if not self.metrics.path.exists():
            return
        tokens_per_step = self.config.batch_size * self.config.seq_len
        for record in read_metrics(self.metrics.path):
            if record.get("split") == "val":
                self.val_losses[record["step"]] = record["loss"]
            elif record.get("split") == "train":
                self.step_seconds.append(tokens_per_step / record["tokens_per_s"])

    def train_step(self) -> dict:
        """One optimizer step on the next batch (in grad_accum micro-batches); appends and
        returns its metrics record."""
        self._compile_when_decided()
        start = time.perf_counter()
        inputs_BL, targets_BL = self.loader.next_batch()
        num_tokens = inputs_BL.numel()
        batches = micro_batches(self.run.shard(inputs_BL, targets_BL), self.config.grad_accum)
        # mtp_loss is 0 without MTP modules
        out = forward_backward(self.forward, self.model, batches, self.run, self._autocast)
        loss = out.loss.item()
        rerun = functools.partial(
            forward_backward, self.forward, self.model, batches, self.run, self._autocast
        )
        skip = functools.partial(
            self.guard.check, self.step + 1, loss, self.model, rerun, self.saved_step
        )
        lr, grad_norm = optimizer_step(
            self.model, self.optimizer, self.config, self.step, self.run, skip
        )
        self.step += 1
        self.routing.add(out.stats)
        self.watch.add(out.stats)
        if self.step % max(self.routing.every, 1) == 0 or self.step == self.config.steps:
            routing_record = self.routing.flush(self.step)
            if self.tensorboard is not None:
                self.tensorboard.routing(routing_record)
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        self.step_seconds.append(seconds)
        record = train_record(
            step=self.step,
            loss=self.run.mean(loss),
            aux_loss=self.run.mean(out.aux_loss.item()),
            lr=lr,
            grad_norm=grad_norm,
            throughput=("tokens_per_s", num_tokens / seconds),
            stats=out.stats,
        )
        if self.guard.skipped:  # train.on_nonfinite "skip": the batches dropped so far
            record["skipped_steps"] = self.guard.skipped
        if self.model_config.mtp_depth:  # weighted, as trained; not in loss or aux_loss
            record["mtp_loss"] = self.run.mean(out.mtp_loss.item())
        exchanged = exchange_seconds(self.model)
        if exchanged:  # expert parallelism: this rank's all-to-all time within the step
            record["all_to_all_s"] = exchanged
            self.exchange_seconds += exchanged
        self._log(record)
        return record

    def _compile_when_decided(self) -> None:
        """Compile the blocks once train.compile is decided: "true" at the first step,
        "auto" after PROBE_STEPS eager steps of this process (or at once when the trainer
        sharing the decision has decided). Under torchrun, "auto" stays eager: the
        constants behind it were measured in one process."""
        if self._compiled is not None:
            return
        decision = self.compile_decision
        if not decision.decided:
            if self.run.world_size > 1:
                decision.settle(False, "train.compile auto: eager under torchrun")
            elif len(self.step_seconds) - self._first_step_here < PROBE_STEPS:
                return
            else:
                probe = self.step_seconds[self._first_step_here :]
                decision.decide(probe, self.config.steps - self.step)
        self._compiled = decision.compiled
        if self._compiled:
            compile_blocks(self.model)

    def evaluate_and_log(self) -> float:
        """Validation loss on the fixed eval batches, appended to the metrics log (and the
        domain x expert counts of those batches to the routing log)."""
        names, domains_per_batch = self.eval_domains
        num_experts = self.model_config.moe.num_experts if self.model_config.moe else 0
        batches = [self.run.shard(*batch) for batch in self.eval_batches]
        observe = None
        if self.run.world_size == 1:  # ranks see a part of each batch: no domain counts
            observe = self.routing.eval_observer(domains_per_batch, len(names), num_experts)
        # Compiled blocks run eager here: evaluation equals `moekit eval` (eager) exactly.
        with self._autocast(), torch.compiler.set_stance("force_eager"):
            loss = self.run.mean(evaluate(self.model, batches, observe=observe))
        self.routing.write_eval(self.step, names)
        self.watch.check(self.step)  # dead experts, collapse: warned once each
        self.val_losses[self.step] = loss
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
        """Checkpoint the current step into run_dir/checkpoint/ (with this trainer's RNG
        state, whichever stream is current when it is called)."""
        state = {
            "step": self.step,
            "train_seconds": self.train_seconds,
            "loader": self.loader.state_dict(),
            "config": read_run_config(self.run_dir),
        }
        with self.own_rng():  # the checkpoint records the global generator's state
            folder = self.run.save(self.run_dir, self.model, self.optimizer, state)
        self.saved_step = self.step
        return folder

    def result(self) -> TrainResult:
        """The run's result so far (a resumed run's earlier steps read back at its start)."""
        evals = sorted(self.val_losses.items())
        tokens = self.step * self.config.batch_size * self.config.seq_len
        return TrainResult(
            steps=self.step,
            final_val_loss=evals[-1][1] if evals else math.nan,
            tokens_per_s=tokens / self.train_seconds if self.train_seconds else math.nan,
            train_seconds=self.train_seconds,
            evals=evals,
            step_seconds=list(self.step_seconds),
        )

    def _autocast(self):
        return autocast(self.config.dtype)


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: an untrained loss must not overflow to inf


def _postfix(record: dict) -> str:
    return (
        f"loss {record['loss']:.3f} aux {record['aux_loss']:.4f} "
        f"drop {record['dropped_fraction']:.1%} {record['tokens_per_s']:,.0f} tok/s"
    )


def _asdict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)
