"""Using a trained run: validation loss of its checkpoint, and streamed text generation."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from ..data import (
    Tokenizer,
    build_builtin_corpus,
    builtin_corpus_name,
    load_documents,
    load_stream,
    sequential_batches,
    tokenize_documents,
)
from ..data.tokenizer import run_tokenizer
from ..generate import check_sampling, stream
from .data import evaluation_data
from .evaluation import autocast, evaluate, fixed_eval_batches
from .rundir import load_trained_model, run_configs


@dataclass
class EvalResult:
    """loss: mean cross entropy in nats per token; perplexity = exp(loss).

    run_batches: whether the loss is on the run's own validation batches (those every
    evaluation during training used), rather than on other data.
    """

    loss: float
    perplexity: float
    num_tokens: int
    run_batches: bool = True


def evaluate_run(
    run_dir: str | Path,
    *,
    data: str | Path | None = None,
    max_batches: int | None = None,
    tokenizer: str | Path | None = None,
) -> EvalResult:
    """Validation loss of a run's checkpoint, in sequences of the run's seq_len.

    With data None this is the training's own definition, so it equals the run's last
    logged validation loss (the comparison table's "final validation loss"): the same
    eval_batches batches of windows spread over the validation split, the same function
    (trainer.evaluate: token-weighted mean cross entropy, eval mode) under the same
    autocast (TrainConfig.dtype).

    Args:
        run_dir: a trained run directory.
        data: None = the run's validation batches (above); "builtin:NAME" = that built-in
            corpus's validation split (e.g. builtin:packages, the held-out corpus); a
            .txt/.jsonl file or folder
            (all of it, tokenised with the run's tokenizer); or a prepared .bin made with
            that tokenizer (RUN/data/val.bin: every window of the validation split).
        max_batches: evaluate only the first batches (None = all of them).
        tokenizer: a tokenizer.json or a folder holding one, instead of the run's own
            (run_tokenizer); with data None the run's data source is then tokenised in
            memory (its validation split), nothing written into run_dir.
    Returns:
        The EvalResult.
    Raises:
        ValueError: see run_tokenizer (before any data is read).
    """
    text_tokenizer = run_tokenizer(run_dir, tokenizer, may_build=data is None)
    model = load_trained_model(run_dir)
    model_config, train_config, data_source = run_configs(run_dir)
    if data is None:
        run_data = evaluation_data(
            run_dir, data=data_source, vocab_size=model_config.vocab_size, tokenizer=text_tokenizer
        )
        batches = fixed_eval_batches(run_data, train_config)
    else:
        builtin = builtin_corpus_name(data)
        if builtin is not None:  # a built-in corpus: its validation split, all of it
            documents = build_builtin_corpus(builtin).validation
            stream = tokenize_documents(documents, text_tokenizer)
        elif Path(data).suffix == ".bin":
            stream = load_stream(data, tokenizer=text_tokenizer)
        else:
            stream = tokenize_documents(load_documents(data), text_tokenizer)
        batches = sequential_batches(
            stream, batch_size=train_config.batch_size, seq_len=train_config.seq_len
        )
    batches = list(islice(batches, max_batches))
    with autocast(train_config.dtype):
        loss = evaluate(model, batches)
    num_tokens = sum(int((targets != -100).sum()) for _, targets in batches)
    return EvalResult(
        loss=loss,
        perplexity=torch.tensor(loss).exp().item(),
        num_tokens=num_tokens,
        run_batches=data is None,
    )


@dataclass
class TextPiece:
    """Newly decoded text, the token it completes, and that token's experts per MoE layer."""

    text: str
    token: int
    expert_ids: list[list[int] | None] | None


def generate_text(
    run_dir: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    show_experts: bool = False,
    compile: bool = False,
    tokenizer: Tokenizer | str | Path | None = None,
) -> Iterator[TextPiece]:
    """Stream text from a run's checkpoint with moekit.generate.stream.

    Generation stops at any of the tokenizer's end-of-sequence ids (Tokenizer.eos_ids: a
    converted checkpoint's eos_token and every eos_token_id of its config.json and
    generation_config.json) or at the model's max_seq_len. The prompt is encoded as
    transformers' tokenizer encodes it (Tokenizer.encode_prompt: bos first when the
    tokenizer adds one). Text is yielded once it decodes to whole characters (a byte-level
    token can end mid-character).

    Args:
        run_dir: a trained run directory.
        prompt: the text to continue; "" starts a new document (after bos, or after the
            document separator when the tokenizer adds no bos).
        max_new_tokens, temperature, top_k, top_p: see moekit.generate.sample_next
            (temperature 0 = greedy).
        seed: seed of the sampling generator.
        show_experts: fill TextPiece.expert_ids.
        compile: run the decode step through torch.compile (pays off for long outputs).
        tokenizer: a Tokenizer, or a tokenizer.json (or a folder holding one) instead of
            the run's own (run_tokenizer).
    Returns:
        An iterator of TextPiece, one per generated token. Every argument is checked (and
        the model loaded) by this call, before the first piece is asked for.
    Raises:
        ValueError: a bad argument, run, tokenizer or prompt (too long for the model).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 0")
    check_sampling(temperature, top_k, top_p)
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = run_tokenizer(run_dir, tokenizer)
    model = load_trained_model(run_dir)
    prompt_ids = tokenizer.encode_prompt(prompt)
    room = model.config.max_seq_len - len(prompt_ids)
    if room < 1:
        raise ValueError(
            f"the prompt has {len(prompt_ids)} tokens; the model's max_seq_len is {model.config.max_seq_len}"
        )
    steps = stream(
        model,
        torch.tensor([prompt_ids]),
        max_new_tokens=min(max_new_tokens, room),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=list(tokenizer.eos_ids) or None,
        return_expert_ids=show_experts,
        generator=torch.Generator().manual_seed(seed),
        compile=compile,
    )
    return _text_pieces(steps, tokenizer)


def _text_pieces(steps: Iterator, tokenizer: Tokenizer) -> Iterator[TextPiece]:
    """The text of each generated token, once it decodes to whole characters; stops at an
    end-of-sequence id."""
    eos_ids = tokenizer.eos_ids
    new_ids: list[int] = []
    shown = ""
    for step in steps:
        token = int(step.token_B[0])
        if token in eos_ids:
            return
        new_ids.append(token)
        text = tokenizer.decode(new_ids)
        piece = "" if text.endswith("\ufffd") else text[len(shown) :]
        shown += piece
        experts = None
        if step.expert_ids is not None:
            experts = [None if ids is None else ids[0].tolist() for ids in step.expert_ids]
        yield TextPiece(text=piece, token=token, expert_ids=experts)
