"""Every `moekit ...` command the README shows runs as written, at toy size.

The commands are read from README.md itself (inline code spans, and the bash blocks'
`... && moekit ...`), so a new or changed command fails test_every_readme_command_is_handled
until it has a case below (or a documented exclusion). Each case runs the README's words
with its placeholders filled in (RUN_DIR, MOE_RUN, TEXT, ...), every `[--optional ...]`
part kept unless the case drops it (saying why), the first of each `a|b` alternative, and
toy-size arguments appended; it asserts exit status 0 and the files the README says the
command writes. The built-in corpora are replaced by a small three-domain corpus, so the
commands that default to them (`moekit train`, the demos) run here in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from helpers import run_cli, write_domain_corpus

import moekit.data
import moekit.data.builtin
import moekit.surgery.runs

README = Path(__file__).resolve().parents[1] / "README.md"

# Micro settings of the default `tiny` preset (and of its dense twin): 16 experts of width 16.
TOY_MODEL = [
    "--model.vocab_size", "320", "--model.d_model", "32", "--model.num_layers", "2",
    "--model.num_heads", "2", "--model.num_kv_heads", "1", "--model.max_seq_len", "64",
    "--model.moe.d_hidden", "16", "--model.moe.d_shared_hidden", "32",
]  # fmt: skip
TOY_STEPS = ["--steps", "2", "--batch-size", "4", "--seq-len", "32", "--eval-every", "2",
             "--train.eval_batches", "2", "--no-progress"]  # fmt: skip
TOY_TRAIN = TOY_MODEL + TOY_STEPS
TOY_FINETUNE = ["--steps", "2", "--train.batch_size", "2", "--train.seq_len", "64",
                "--no-progress"]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Case:
    """How one README command runs here.

    toy: arguments appended (toy size). drop: optional parts `[...]` left out, each with
    its reason in a comment. writes: files the command writes: a glob in the folder it ran
    in, or a path with {out}, {html} (those flags' values) or {dest} (the folder a command
    reads, convert's destination).
    """

    toy: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()


CASES = {
    # The main job: the tiny MoE against its dense twin, on the (replaced) default corpus.
    "moekit train": Case(
        toy=tuple(TOY_TRAIN), writes=("runs/compare-*/comparison.json", "runs/compare-*/loss.png")
    ),
    "moekit train --preset tiny --no-compare": Case(
        toy=tuple(TOY_TRAIN), writes=("runs/tiny-*/checkpoint/model.safetensors",)
    ),
    "moekit train --data DIR/train.bin": Case(
        toy=tuple(TOY_TRAIN), writes=("runs/compare-*/comparison.json",)
    ),
    # NEW: a copy of MOE_RUN (2 steps done) whose budget is raised to 4 steps.
    "moekit train --resume --out NEW": Case(writes=("{out}/checkpoint/model.safetensors",)),
    "moekit train --no-compare --routing.replay TRACE [--routing.replay_mode ids|ids+weights]": (
        Case(
            toy=(
                *TOY_MODEL,
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--seq-len",
                "32",
                "--no-progress",
            ),
            writes=("runs/replay-*/config.json",),
        )
    ),
    "moekit train --task classify-text | classify-digits [--model moe|hmoe|dense]": Case(
        toy=(
            "--steps",
            "2",
            "--eval-every",
            "2",
            "--batch-size",
            "16",
            "--no-progress",
            "--snippet-tokens",
            "4",
            "--buckets",
            "64",
            "--train-per-domain",
            "20",
            "--val-per-domain",
            "5",
        ),
        writes=("runs/*/results.json", "runs/*/specialisation.json"),
    ),  # fmt: skip
    "moekit train --task mmoe-synthetic --correlation 0.5 [--model mmoe|shared-bottom]": Case(
        toy=(
            "--steps",
            "2",
            "--eval-every",
            "2",
            "--batch-size",
            "16",
            "--no-progress",
            "--examples",
            "200",
            "--dim",
            "8",
        ),
        writes=("runs/*/results.json",),
    ),  # fmt: skip
    "moekit train --task vit --capacity-factor 0.5 --priority batch|position": Case(
        toy=(
            "--steps",
            "2",
            "--eval-every",
            "2",
            "--batch-size",
            "16",
            "--no-progress",
            "--data",
            "digits",
            "--layers",
            "2",
            "--d-model",
            "16",
            "--heads",
            "2",
            "--mlp-hidden",
            "16",
            "--num-experts",
            "4",
        ),
        writes=("runs/*/results.json",),
    ),  # fmt: skip
    "moekit prepare TEXT --out DIR": Case(
        toy=("--vocab-size", "320"),
        writes=("{out}/train.bin", "{out}/val.bin", "{out}/tokenizer.json"),
    ),
    "moekit eval RUN_DIR [--data PATH]": Case(toy=("--max-batches", "2")),
    'moekit generate RUN_DIR --prompt "..." [--temperature T --top-k K --top-p P] '
    "[--show-experts] [--compile]": Case(
        toy=("--max-new-tokens", "4"),
        drop=("--compile",),  # compiling the decode step takes longer than this whole file
    ),
    "moekit bench [--quick] [--dtype fp32|bf16|both] [--allocator both|default|keep] "
    "[--compile]": Case(
        toy=("--shapes", "32,16,32,4,2", "--reps", "1", "--warmup", "0", "--no-hf"),
        drop=("--compile",),  # torch.compile of the layer: tens of seconds
    ),
    "moekit routers": Case(),
    "moekit inspect mixtral_8x7b [--json]": Case(),
    "moekit inspect --help": Case(),
    "moekit convert HF_FOLDER RUN_DIR": Case(
        writes=("{dest}/config.json", "{dest}/tokenizer.json")
    ),
    "moekit convert RUN_DIR HF_FOLDER": Case(
        writes=("{dest}/config.json", "{dest}/model.safetensors")
    ),
    "moekit upcycle DENSE_RUN --out NEW --num-experts 8 --top-k 2 [--steps N]": Case(
        toy=("--no-progress",), writes=("{out}/checkpoint/model.safetensors",)
    ),
    "moekit add-experts MOE_RUN --out NEW --num 16 --method grow [--steps N]": Case(
        toy=("--no-progress",), writes=("{out}/checkpoint/model.safetensors",)
    ),
    "moekit merge --demo": Case(
        toy=(
            "--parent-steps",
            "2",
            "--branch-steps",
            "1",
            "--router-steps",
            "1",
            "--joint-steps",
            "1",
            "--domains",
            "code,prose",
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--no-progress",
            *TOY_MODEL[:8],
            "--model.d_hidden",
            "64",
            "--train.eval_batches",
            "1",
        ),
        writes=("runs/btx-*/btx.json",),
    ),  # fmt: skip
    "moekit merge BRANCH_RUN... --parent PARENT_RUN --out NEW": Case(
        toy=("--router-steps", "1", "--joint-steps", "1", "--no-progress"),
        writes=("{out}/stage2/checkpoint/model.safetensors",),
    ),
    "moekit finetune BASE --data chats.jsonl --out runs/sft [--steps N] [--lora.rank 8]": Case(
        toy=tuple(TOY_FINETUNE),
        writes=("{out}/hf/tokenizer_config.json", "{out}/adapter", "{out}/merged"),
    ),
    "moekit finetune BASE --routing.replay TRACE --out DIR": Case(
        toy=tuple(TOY_FINETUNE), writes=("{out}/hf/config.json",)
    ),
    "moekit finetune --demo": Case(
        toy=(
            "--seeds",
            "1",
            "--no-progress",
            "--demo.pretrain_steps",
            "1",
            "--demo.pretrain_batch",
            "2",
            "--demo.finetune_steps",
            "1",
            "--demo.finetune_batch",
            "2",
            "--demo.eval_per_family",
            "1",
            "--demo.exact_match_per_family",
            "1",
            "--demo.max_new_tokens",
            "2",
        ),
        writes=("runs/*/results.json",),
    ),  # fmt: skip
    "moekit report RUN_DIR [--out FILE]": Case(writes=("{out}",)),
    "moekit report runs/compare-<time>": Case(writes=("{dest}/report.html",)),
    'moekit route RUN_DIR --text "..." [--layer N]': Case(),
    "moekit routing record RUN_OR_HF_FOLDER --data TEXT --out TRACE [--dtype bf16] "
    "[--generate N]": Case(),
    "moekit routing diff A B [--json] [--html FILE]": Case(writes=("{html}",)),
    "moekit doctor RUN_OR_HF_FOLDER_OR_ADAPTER [--base BASE] [--data TEXT] [--json]": Case(
        toy=("--tokens", "256"),
        drop=("--base",),  # --base goes with an adapter target; the target here is a run
    ),
    "moekit bench comm --model mixtral_8x7b --ep 1 2 4 8 --bandwidth 25 --latency 10": Case(),
}

# README mentions that are not commands of their own, and commands this file does not run.
EXCLUDED = {
    "moekit convert": "a name in prose; both directions of convert run above",
    "moekit doctor": "a name in prose; the doctor command runs above",
    "moekit train --task ...": "a pointer to the --task lines, which run above",
    "torchrun --nproc-per-node 2 -m moekit train --parallel.ep 2": (
        "two gloo processes: tests/test_parallel_train.py runs this job at micro size"
    ),
    "torchrun --nproc-per-node 4 -m moekit train --parallel.fsdp true --parallel.ep 2": (
        "four gloo processes: tests/test_parallel_fsdp.py runs FSDP x EP at micro size"
    ),
}


def readme_commands(text: str) -> set[str]:
    """The commands in README text: inline code spans and bash lines that run moekit,
    whitespace collapsed (a span may wrap across lines)."""
    commands = set()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    for block in blocks:
        for line in block.splitlines():
            if "moekit " in line:
                commands.add(line.rpartition("&& ")[2].strip())
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    for span in re.findall(r"`([^`]+)`", prose):
        span = " ".join(span.split())
        if span.startswith("moekit ") or span == "moekit" or " -m moekit " in span:
            commands.add(span)
    return commands


def small_corpus(text: Path):
    """Stands in for the built-in corpus: write_domain_corpus's code, prose and math
    documents (20 of each), the last 4 of each domain for validation."""
    from moekit.data import Corpus, Document

    lines = [json.loads(line) for line in text.read_text(encoding="utf-8").splitlines()]
    documents = [Document(id=f"{x['domain']}/{i}", domain=x["domain"], text=x["text"])
                 for i, x in enumerate(lines)]  # fmt: skip
    return Corpus(train=documents[:-12], validation=documents[-12:])


@pytest.fixture(scope="module")
def made(tmp_path_factory, one_thread):
    """What the README's placeholders stand for, built once: TEXT, the main job's comparison
    (MOE_RUN, DENSE_RUN), a Hugging Face folder, a routing trace, chats.jsonl, a prepared
    DIR; the built-in corpus replaced by small_corpus while this module runs."""
    root = tmp_path_factory.mktemp("readme")
    text = root / "corpus.jsonl"
    write_domain_corpus(text)
    corpus = small_corpus(text)
    with pytest.MonkeyPatch.context() as patch:
        for module in (moekit.data, moekit.data.builtin, moekit.surgery.runs):
            patch.setattr(module, "build_corpus", lambda *args, **kwargs: corpus)
        cmp = root / "compare"
        _ok("train", "--data", str(text), "--out", str(cmp), *TOY_TRAIN)
        _ok("convert", str(cmp / "moe"), str(root / "hf"))
        lines = root / "lines.txt"  # routing record's TEXT: a sequence per line
        lines.write_text("def f(x):\n    return x + 1\nThe quick brown fox.\n", encoding="utf-8")
        _ok(
            "routing",
            "record",
            str(cmp / "moe"),
            "--data",
            str(lines),
            "--out",
            str(root / "trace"),
        )
        _ok("prepare", str(text), "--out", str(root / "prepared"), "--vocab-size", "320")
        chats = root / "chats.jsonl"
        examples = [{"messages": [{"role": "user", "content": "What is 2 + 3?"},
                               {"role": "assistant", "content": "5"}]},
                 {"prompt": "Name a colour.", "response": "Blue."}]  # fmt: skip
        chats.write_text(
            "".join(json.dumps(line) + "\n" for line in examples * 4), encoding="utf-8"
        )
        yield {
            "TEXT": text, "RUN_DIR": cmp / "moe", "MOE_RUN": cmp / "moe", "BASE": cmp / "moe",
            "DENSE_RUN": cmp / "dense", "PARENT_RUN": cmp / "dense", "HF_FOLDER": root / "hf",
            "RUN_OR_HF_FOLDER": root / "hf", "RUN_OR_HF_FOLDER_OR_ADAPTER": cmp / "moe",
            "runs/compare-<time>": cmp, "TRACE": root / "trace", "A": root / "trace",
            "B": root / "trace", "chats.jsonl": chats, "DIR/train.bin": root / "prepared/train.bin",
            "PATH": cmp / "moe/data/val.bin", "N": "1", "T": "0.8", "K": "5", "P": "0.9",
            "...": "def f(x):", "LINES": lines,
        }  # fmt: skip


def _ok(*args: str) -> str:
    code, stdout, stderr = run_cli(*args)
    assert code == 0, f"moekit {' '.join(args)}\n{stdout[-2000:]}\n{stderr[-2000:]}"
    return stdout


def words(command: str, drop: tuple[str, ...]) -> list[str]:
    """The README command as arguments: optional parts kept (but those starting with a flag
    in drop), the first of each a|b alternative, "moekit" removed."""
    command = re.sub(r"\[([^\]]*)\]", lambda m: "" if m[1].startswith(drop) else m[1], command)
    command = re.sub(r"(\S+) \| \S+", r"\1", command)  # classify-text | classify-digits
    command = re.sub(r"([^\s|]+)(\|[^\s|]+)+", r"\1", command)  # fp32|bf16|both
    return shlex.split(command)[1:]


def fill(args: list[str], made: dict, tmp_path: Path) -> list[str]:
    """Placeholders replaced by what `made` built; what a command writes (--out, --html,
    convert's destination) goes to a new path in tmp_path, except the run --resume continues
    (a copy of MOE_RUN)."""
    filled = []
    for i, arg in enumerate(args):
        previous = args[i - 1] if i else ""
        is_destination = args[0] == "convert" and i == 2
        if previous == "--out" and "--resume" in args:
            filled.append(str(unfinished_copy(made["MOE_RUN"], tmp_path / "resumed")))
        elif previous in ("--out", "--html") or is_destination:
            filled.append(str(tmp_path / f"out{i}"))
        elif arg == "BRANCH_RUN...":
            filled += [str(made["DENSE_RUN"])] * 2
        elif arg == "TEXT" and args[:2] == ["routing", "record"]:
            filled.append(str(made["LINES"]))
        elif arg in made:
            filled.append(str(made[arg]))
        else:
            assert not re.fullmatch(r"[A-Z_]+|.*[<>].*", arg), f"unfilled placeholder {arg}"
            filled.append(arg)
    return filled


def unfinished_copy(run: Path, copy: Path) -> Path:
    """A copy of run with 2 more steps to go (what a stopped job leaves)."""
    shutil.copytree(run, copy)
    config = json.loads((copy / "config.json").read_text())
    config["train"]["steps"] += 2
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("command", list(CASES))
def test_readme_command_runs(command, made, tmp_path, monkeypatch):
    case = CASES[command]
    monkeypatch.chdir(tmp_path)  # default output folders (runs/...) land here
    args = fill(words(command, case.drop), made, tmp_path) + list(case.toy)
    if args[-1] == "--help":
        with pytest.raises(SystemExit) as stopped:
            _ok(*args)
        assert stopped.value.code == 0
    else:
        assert _ok(*args).strip(), "every command prints something"
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("**/*"))
    # dest: the folder a command reads and writes into, or convert's destination.
    dest = args[2] if args[0] == "convert" else args[1] if len(args) > 1 else ""
    values = {"dest": dest, "out": _value(args, "--out"), "html": _value(args, "--html")}
    for pattern in case.writes:
        found = list(tmp_path.glob(pattern)) if "{" not in pattern else []
        path = Path(pattern.format(**values)) if "{" in pattern else None
        assert found or (path is not None and path.exists()), (
            f"{pattern} not written: {written[:40]}"
        )


def _value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1] if flag in args else ""


def test_every_readme_command_is_handled():
    """The README's commands are exactly the ones run above and the ones excluded."""
    shown = readme_commands(README.read_text(encoding="utf-8"))
    handled = set(CASES) | set(EXCLUDED)
    assert shown - handled == set(), "README commands with no case here (add one to CASES)"
    assert handled - shown == set(), "cases of commands the README no longer shows"
    assert set(CASES).isdisjoint(EXCLUDED)
