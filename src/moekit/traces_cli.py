"""`moekit routing`: record, show, diff, import and export routing traces (moekit.traces).

It sits with the commands that load Hugging Face folders (above interop/ and train/),
while the traces package sits below train/, so the trainer and the report use it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .errors import command_error

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def routing_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        return ACTIONS[args.action](args)
    except (ValueError, OSError) as error:
        return command_error(f"routing {args.action}", error)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit routing",
        description="Routing traces: which experts every token took. record: from a moekit "
        "run or a Hugging Face folder (through transformers' own model, or converted); "
        "diff: two traces of the same tokens, layer by layer; show: a trace's summary; "
        "import/export: vLLM's and SGLang's routed-expert layouts. docs/traces.md.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    _record_parser(
        sub.add_parser("record", help="record a model's routing over a text or token file")
    )
    _trace_parsers(sub)
    return parser


def _record_parser(rec: argparse.ArgumentParser) -> None:
    rec.add_argument(
        "source",
        help="a moekit run (or comparison) folder, a Hugging Face folder, or a preset name "
        "(random weights, --seed)",
    )
    data = rec.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="a text file: each non-empty line is one sequence")
    data.add_argument("--tokens", help="a file of token ids: one sequence per line")
    data.add_argument("--from-trace", help="the sequences of a trace (the same tokens again)")
    rec.add_argument("--out", required=True, help="the trace folder to write")
    rec.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="default fp32")
    rec.add_argument(
        "--engine",
        choices=("auto", "moekit", "transformers"),
        default="auto",
        help="a Hugging Face folder: transformers' model (auto) or moekit's conversion",
    )
    rec.add_argument(
        "--generate", type=int, default=0, help="greedy-generate N tokens from each line"
    )
    rec.add_argument(
        "--padding",
        choices=("right", "left", "none"),
        default="right",
        help="one padded batch (right, left) or one sequence at a time (none)",
    )
    rec.add_argument("--no-logits", action="store_true", help="leave the router logits out")
    rec.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="--data's tokenizer: a tokenizer.json, or a folder holding one (default: the "
        "source's own; needed for a run converted without one; not copied)",
    )
    rec.add_argument("--seed", type=int, default=0, help="a preset's weights (default 0)")
    rec.add_argument(
        "--replay",
        metavar="TRACE",
        help="record a forward that replays this trace (moekit models; its sequences)",
    )
    rec.add_argument(
        "--replay-mode", choices=("ids", "ids+weights"), default="ids", help="default ids"
    )


def _trace_parsers(sub) -> None:
    """diff, show, import and export: the actions on recorded traces."""
    diff = sub.add_parser("diff", help="compare trace B against trace A")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--json", action="store_true", help="print JSON instead of a table")
    diff.add_argument("--html", help="also write an HTML page with the diff section")
    diff.add_argument(
        "--save", metavar="RUN", help="also save it in RUN, whose `moekit report` then shows it"
    )
    show = sub.add_parser("show", help="print a trace's model, recording and size")
    show.add_argument("trace")
    imp = sub.add_parser("import", help="read a vLLM or SGLang JSON output into a trace")
    imp.add_argument("engine", choices=("vllm", "sglang"))
    imp.add_argument("file", help="a JSON list of requests (docs/traces.md, 'Engines')")
    imp.add_argument("--like", required=True, help="a trace or model source of the same model")
    imp.add_argument("--out", required=True)
    exp = sub.add_parser("export", help="write a trace in vLLM's or SGLang's layout (JSON)")
    exp.add_argument("engine", choices=("vllm", "sglang"))
    exp.add_argument("trace")
    exp.add_argument("--out", required=True)


def _record(args) -> int:
    from .traces import save_trace
    from .traces.run import record_forward, record_generation

    torch.set_num_threads(min(torch.get_num_threads(), 2))
    text = bool(args.data) and not args.replay
    model, tokenizer = load_source(args.source, args.engine, args.seed, args.tokenizer, text)
    model = model.to(getattr(torch, DTYPES[args.dtype])).eval()
    if args.replay:
        if args.generate > 0 or args.padding != "right":
            raise ValueError(
                "--replay records one right-padded forward; drop --generate, --padding"
            )
        trace = _record_replayed(model, args)
    else:
        sequences = read_sequences(args, tokenizer)
        if args.generate > 0:
            trace = record_generation(model, sequences, args.generate, not args.no_logits)
        else:
            trace = record_forward(model, sequences, not args.no_logits, args.padding)
    trace.recording["source"] = str(args.source)
    path = save_trace(trace, args.out)
    print(f"wrote {path}: {trace.num_sequences} sequences, {trace.num_tokens} tokens, "
          f"{len(trace.model.layers)} MoE layers, top-{trace.model.top_k}, {args.dtype}")  # fmt: skip
    return 0


def _record_replayed(model, args):
    """The routing a moekit model takes while it replays --replay (the same sequences)."""
    from .traces import load_trace, record_routing, replay_routing

    trace = load_trace(args.replay)
    if (args.tokens or args.data or args.from_trace) and args.from_trace != args.replay:
        raise ValueError("--replay runs the trace's own sequences: pass --from-trace TRACE")
    with replay_routing(model, trace, args.replay_mode) as batch, torch.no_grad():
        with record_routing(model, not args.no_logits) as recorder:
            model(batch.tokens_BN, attention_mask_BT=batch.attention_mask_BN)
    recorded = recorder.trace(batch.tokens_BN, batch.rows_BN >= 0)
    recorded.recording["replay"] = {"trace": str(args.replay), "mode": args.replay_mode}
    return recorded


def load_source(
    source: str,
    engine: str = "auto",
    seed: int = 0,
    tokenizer: str | None = None,
    text: bool = False,
):
    """(model in eval mode, tokenizer or None) of a moekit run, a Hugging Face folder or a
    preset (random weights from seed). tokenizer: a tokenizer.json (or a folder holding
    one) instead of the source's own; text: the caller encodes text, so a run converted
    without a tokenizer is refused here, before its weights are read (run_tokenizer)."""
    from .models import PRESETS

    path = Path(source)
    if not path.is_dir() and source in PRESETS:
        return _preset_source(source, engine, seed, tokenizer)
    if not path.is_dir():
        raise ValueError(
            f"{source!r} is neither a folder (a moekit run or a Hugging Face model) nor a "
            f"preset ({', '.join(PRESETS)})"
        )
    from .train.compare import comparison_runs

    runs = comparison_runs(path)
    if runs is not None:
        path = runs["moe"]
    config = path / "config.json"
    hf = config.is_file() and not (path / "checkpoint").is_dir()
    if hf and "model_type" not in json.loads(config.read_text(encoding="utf-8")):
        hf = False
    if not hf:
        if engine == "transformers":
            raise ValueError(
                f"--engine transformers needs a Hugging Face folder; {source!r} is not"
            )
        return _run_source(path, tokenizer, text)
    return _hf_source(path, engine, tokenizer)


def _preset_source(source: str, engine: str, seed: int, tokenizer: str | None):
    """A preset's model with random weights from seed, and the tokenizer asked for."""
    from .data.tokenizer import check_vocabulary, load_tokenizer_arg
    from .models import PRESETS, Transformer

    if engine == "transformers":
        raise ValueError(f"--engine transformers needs a Hugging Face folder, not {source!r}")
    torch.manual_seed(seed)
    model = Transformer(PRESETS[source]()).eval()
    explicit = load_tokenizer_arg(tokenizer) if tokenizer else None
    if explicit is not None:
        check_vocabulary(explicit, model.config.vocab_size, tokenizer)
    return model, _MoekitTokens(explicit)


def _run_source(path: Path, tokenizer: str | None, text: bool):
    """A moekit run's trained model, and its tokenizer (or the one asked for) when it has
    one or the caller encodes text."""
    from .data.tokenizer import run_tokenizer
    from .train.rundir import load_trained_model

    has_own = (path / "tokenizer.json").is_file()
    found = run_tokenizer(path, tokenizer, may_build=True) if tokenizer or has_own or text else None
    return load_trained_model(path), _MoekitTokens(found)


def _hf_source(path: Path, engine: str, tokenizer: str | None):
    """A Hugging Face folder's model (transformers' own, or moekit's conversion) and its
    tokenizer's encode_prompt."""
    from .data.tokenizer import check_vocabulary, load_tokenizer_arg

    if engine == "moekit":
        from .interop import load_hf

        model = load_hf(path)
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, attn_implementation="eager"
        ).eval()
    if tokenizer is None:
        return model, _hf_tokenizer(path)
    explicit = load_tokenizer_arg(tokenizer)
    check_vocabulary(explicit, model.config.vocab_size, tokenizer)
    return model, explicit.encode_prompt


class _MoekitTokens:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("the model has no tokenizer; pass --tokens")
        return self.tokenizer.encode_prompt(text)


def _hf_tokenizer(path: Path):
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        return None
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return lambda text: tokenizer(text)["input_ids"]


def read_sequences(args, tokenizer) -> list[list[int]]:
    """The sequences of --tokens (ids per line), --data (text per line, tokenised) or
    --from-trace (a trace's sequences)."""
    if args.from_trace:
        from .traces import load_trace

        return [s.tolist() for s in load_trace(args.from_trace).sequences()]
    path = Path(args.tokens or args.data)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} holds no sequence")
    if args.tokens:
        try:
            return [[int(t) for t in line.replace(",", " ").split()] for line in lines]
        except ValueError:
            raise ValueError(f"--tokens {path}: each line must be token ids") from None
    if tokenizer is None:
        raise ValueError(
            f"{args.source} has no tokenizer; pass --tokens with token ids (or --tokenizer PATH)"
        )
    return [tokenizer(line) for line in lines]


def _diff(args) -> int:
    from .traces import diff_traces, load_trace

    diff = diff_traces(load_trace(args.a), load_trace(args.b), args.a, args.b)
    if args.html:
        from .report.trace_diff import write_diff_page

        print(f"wrote {write_diff_page(diff, args.html)}", file=sys.stderr)
    if args.save:
        from .report.trace_diff import DIFF_FILE

        if not Path(args.save).is_dir():
            raise ValueError(f"--save {args.save!r} is not a folder")
        path = Path(args.save) / DIFF_FILE
        path.write_text(json.dumps(diff.to_json(), indent=1), encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(diff.to_json(), indent=1) if args.json else diff.table())
    return 0


def _show(args) -> int:
    from .traces import load_trace

    trace = load_trace(args.trace)
    m = trace.model
    print(f"{args.trace}: {trace.num_sequences} sequences, {trace.num_tokens} tokens")
    print(f"model: {m.architecture}, {len(m.layers)} MoE layers of {m.num_blocks} blocks "
          f"(blocks {m.blocks}), {m.num_experts} experts, top-{m.top_k}, {m.dtype}")  # fmt: skip
    parts = [n for n in ("weights", "logits", "valid", "routed") if getattr(trace, n) is not None]
    print(f"tensors: tokens, positions, offsets, ids{''.join(', ' + p for p in parts)}")
    for key, value in trace.recording.items():
        print(f"recording.{key}: {value}")
    return 0


def _like(source: str):
    from .traces import load_trace
    from .traces.format import META_FILE

    if (Path(source) / META_FILE).is_file():
        return load_trace(source).model
    from .traces.record import moe_layers, moekit_identity
    from .traces.record_hf import hf_identity, hf_routers

    model, _ = load_source(source)
    layers = moe_layers(model)
    return moekit_identity(model, layers) if layers else hf_identity(model, hf_routers(model))


def _import(args) -> int:
    from .traces import save_trace
    from .traces.engines import from_sglang, from_vllm

    requests = json.loads(Path(args.file).read_text(encoding="utf-8"))
    if not isinstance(requests, list):
        raise ValueError(f"{args.file} must hold a JSON list of requests")
    reader = from_vllm if args.engine == "vllm" else from_sglang
    trace = reader(_like(args.like), requests)
    path = save_trace(trace, args.out)
    print(f"wrote {path}: {trace.num_sequences} sequences, {trace.num_tokens} tokens")
    return 0


def _export(args) -> int:
    from .traces import load_trace
    from .traces.engines import to_sglang, to_vllm

    trace = load_trace(args.trace)
    requests = (to_vllm if args.engine == "vllm" else to_sglang)(trace)
    for request in requests:
        if "routed_experts" in request and not isinstance(request["routed_experts"], str):
            request["routed_experts"] = request["routed_experts"].tolist()
    Path(args.out).write_text(json.dumps(requests), encoding="utf-8")
    print(f"wrote {args.out}: {len(requests)} requests")
    return 0


ACTIONS = {
    "record": _record,
    "diff": _diff,
    "show": _show,
    "import": _import,
    "export": _export,
}
