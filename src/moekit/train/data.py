"""The token streams of a run: a built-in corpus, user text, or a prepared .bin.

A built-in corpus (the default one, or `builtin:packages`) and user text are tokenised
once into the run directory:
    RUN/tokenizer.json, RUN/data/train.bin, RUN/data/val.bin (+ sidecars)
and a resumed run (or `moekit eval`) reads them back. A built-in corpus also leaves
RUN/data/corpus.json (its name, version, SHA-256, characters and tokens per split), and
the line Corpus.describe makes of it is printed when it is tokenised. A run directory that already holds
a tokenizer (a converted checkpoint's, with its special_tokens.json, or one copied from
the run it starts from) keeps it, and its text is tokenised with it; otherwise a new
tokenizer is trained on the training split. A prepared stream (`moekit
prepare`) is read where it lies: DIR/train.bin, with DIR/val.bin and DIR/tokenizer.json
beside it; its tokenizer is copied into the run directory.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ..data import (
    BatchLoader,
    Corpus,
    CorpusConfig,
    Document,
    PackageCorpusConfig,
    Tokenizer,
    TokenStream,
    build_builtin_corpus,
    builtin_corpus_name,
    copy_tokenizer,
    load_documents,
    load_stream,
    prepare,
    read_stream_meta,
    sequential_batches,
    split_documents,
    tokenize_documents,
    train_tokenizer,
)
from ..data.tokenizer import TOKENIZER_FILE
from ..parallel import ParallelMesh
from .config import TrainConfig
from .run import run_on

DATA_DIR = "data"
TRAIN_FILE, VAL_FILE = "train.bin", "val.bin"
CORPUS_FILE = "corpus.json"


@dataclass
class RunData:
    """The tokenizer and the two token streams a run trains and evaluates on.

    The Trainer asks its data for three things, which instruction data (finetune/) also
    answers: `loader(config)` (next_batch, state_dict, load_state_dict), `eval_windows(config)`
    ((inputs_BL, targets_BL, domains_BL) batches, the same every evaluation) and
    `domain_names` (what the domain ids of those batches stand for).
    """

    tokenizer: Tokenizer
    train: TokenStream
    validation: TokenStream

    def loader(self, config: TrainConfig) -> BatchLoader:
        """Shuffled, resumable windows of the training stream."""
        return BatchLoader(
            self.train, batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed
        )

    def eval_windows(self, config: TrainConfig) -> list[tuple[Tensor, Tensor, Tensor]]:
        """eval_batches batches of evenly spaced validation windows, with their domains.

        Spread over the whole split, not its head: the split is laid out document by
        document and the built-in corpus groups its documents by domain, so the first
        batches would hold only the first domains.
        """
        return list(
            sequential_batches(
                self.validation,
                batch_size=config.batch_size,
                seq_len=config.seq_len,
                return_domains=True,
                max_windows=config.eval_batches * config.batch_size,
            )
        )

    @property
    def domain_names(self) -> tuple[str, ...]:
        return self.validation.domains


def prepare_run_data(
    run_dir: str | Path,
    *,
    data: str | Path | None = None,
    vocab_size: int = 4096,
    corpus_config: CorpusConfig | PackageCorpusConfig | None = None,
    mesh: ParallelMesh | None = None,
    log: Callable[[str], None] = print,
) -> RunData:
    """Tokenise the run's data into run_dir, or read it back when it is already there.

    Args:
        run_dir: the run directory.
        data: None for the default corpus; "builtin:NAME" for a built-in corpus
            ("builtin:packages": the held-out corpus, data/package_corpus.py); a
            .txt/.jsonl file or folder of user text (split 95/5 by document); or a
            prepared train .bin.
        vocab_size: the tokenizer's vocabulary (the model's vocab_size).
        corpus_config: the built-in corpus's config (a smaller one for tests and quick
            experiments): a CorpusConfig, or a PackageCorpusConfig for builtin:packages.
        mesh: under torchrun, rank 0 tokenises and the other ranks then read its files.
        log: where the corpus line goes (its name, size and hash) when a built-in corpus
            is tokenised.
    Returns:
        The RunData.
    """
    with run_on(mesh).main_first():
        return _prepare_run_data(Path(run_dir), data, vocab_size, corpus_config, log)


def _prepare_run_data(
    run_dir: Path,
    data: str | Path | None,
    vocab_size: int,
    corpus_config: CorpusConfig | PackageCorpusConfig | None,
    log: Callable[[str], None],
) -> RunData:
    if data is not None and Path(data).suffix == ".bin":
        return _prepared_stream_data(run_dir, Path(data))
    stream_dir = run_dir / DATA_DIR
    has_tokenizer = (run_dir / TOKENIZER_FILE).exists()
    # The validation sidecar is written last: its presence marks the streams as complete.
    if not has_tokenizer or not _sidecar(stream_dir / VAL_FILE).exists():
        train_docs, val_docs, corpus = _documents(data, corpus_config)
        if has_tokenizer:
            tokenizer = Tokenizer.load(run_dir)
        else:
            tokenizer = train_tokenizer((d.text for d in train_docs), vocab_size=vocab_size)
        prepare(train_docs, tokenizer, stream_dir / TRAIN_FILE)
        prepare(val_docs, tokenizer, stream_dir / VAL_FILE)
        if corpus is not None:
            log(record_corpus(corpus, stream_dir))
        if not has_tokenizer:
            tokenizer.save(run_dir)
    return _load(run_dir / TOKENIZER_FILE, stream_dir / TRAIN_FILE, stream_dir / VAL_FILE)


def evaluation_data(
    run_dir: str | Path, *, data: str | Path | None, vocab_size: int, tokenizer: Tokenizer | None
) -> RunData:
    """The data a run is evaluated (or reported) on, in the tokenizer a command was given.

    tokenizer None, or the run's own: prepare_run_data's (the streams in run_dir, made
    once). Another tokenizer (--tokenizer): the validation split of `data` tokenised with
    it in memory, nothing written into run_dir; its train stream is that same stream,
    since nothing trains on it.
    """
    run_dir = Path(run_dir)
    own = (run_dir / TOKENIZER_FILE).is_file()
    if tokenizer is None or (own and Tokenizer.load(run_dir) == tokenizer):
        return prepare_run_data(run_dir, data=data, vocab_size=vocab_size)
    if data is not None and Path(data).suffix == ".bin":
        validation = load_stream(Path(data).parent / VAL_FILE, tokenizer=tokenizer)
    else:
        validation = tokenize_documents(_documents(data, None)[1], tokenizer)
    return RunData(tokenizer=tokenizer, train=validation, validation=validation)


def record_corpus(corpus: Corpus, stream_dir: str | Path) -> str:
    """Write stream_dir/corpus.json for a corpus tokenised into stream_dir's train/val.bin.

    Args:
        corpus: the built-in corpus the streams were made from.
        stream_dir: the folder holding train.bin and val.bin and their sidecars.
    Returns:
        The corpus line, e.g. "corpus: default v2, 10.9 M chars, 3.39 M train tokens,
        0.161 M validation tokens, sha256 538ce7aff58b" (tokens count the end-of-document
        ids).
    """
    stream_dir = Path(stream_dir)
    train_tokens = read_stream_meta(stream_dir / TRAIN_FILE)["num_tokens"]
    val_tokens = read_stream_meta(stream_dir / VAL_FILE)["num_tokens"]
    record = {
        "name": corpus.name,
        "version": corpus.version,
        "sha256": corpus.sha256,
        "chars": corpus.num_chars,
        "train_tokens": train_tokens,
        "validation_tokens": val_tokens,
        "stats": corpus.stats(),
    }
    (stream_dir / CORPUS_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return corpus.describe(train_tokens, val_tokens)


def _sidecar(stream_path: Path) -> Path:
    """The JSON sidecar prepare() writes after a stream's tokens (NAME.json)."""
    return stream_path.with_suffix(".json")


def copy_run_data(source_dir: str | Path, run_dir: str | Path) -> None:
    """Give run_dir the tokenizer and streams of source_dir (the same tokens, no re-tokenising)."""
    source_dir, run_dir = Path(source_dir), Path(run_dir)
    if (source_dir / DATA_DIR).exists():
        shutil.copytree(source_dir / DATA_DIR, run_dir / DATA_DIR, dirs_exist_ok=True)
    copy_tokenizer(source_dir, run_dir)


def write_prepared(
    data: str | Path | None,
    out_dir: str | Path,
    *,
    vocab_size: int = 4096,
    log: Callable[[str], None] = print,
) -> Path:
    """`moekit prepare`: tokenise text (or a built-in corpus: None, "builtin:NAME") into out_dir.

    Returns:
        out_dir/train.bin (with val.bin and tokenizer.json beside it, and corpus.json for
        a built-in corpus, whose line goes to log).
    """
    out_dir = Path(out_dir)
    train_docs, val_docs, corpus = _documents(data, None)
    tokenizer = train_tokenizer((d.text for d in train_docs), vocab_size=vocab_size)
    tokenizer.save(out_dir)
    prepare(val_docs, tokenizer, out_dir / VAL_FILE)
    train_path = prepare(train_docs, tokenizer, out_dir / TRAIN_FILE)
    if corpus is not None:
        log(record_corpus(corpus, out_dir))
    return train_path


def _documents(
    data: str | Path | None, corpus_config: CorpusConfig | PackageCorpusConfig | None
) -> tuple[list[Document], list[Document], Corpus | None]:
    """(train, validation, the built-in corpus or None for user text)."""
    name = builtin_corpus_name(data)
    if name is not None:
        corpus = build_builtin_corpus(name, corpus_config)
        return corpus.train, corpus.validation, corpus
    documents = load_documents(data)
    if len(documents) < 2:
        # One document cannot be split by document; cut it into pieces at line breaks.
        documents = _pieces(documents[0], 20)
    train, validation = split_documents(documents, validation_fraction=0.05)
    if not train:
        raise ValueError(f"{str(data)!r} has too little text to split into train and validation")
    return train, validation, None


def _pieces(document: Document, count: int) -> list[Document]:
    """Split one document into about `count` documents of whole lines."""
    lines = document.text.splitlines(keepends=True)
    size = max(1, len(lines) // count)
    chunks = ["".join(lines[i : i + size]) for i in range(0, len(lines), size)]
    return [
        Document(text=text, domain=document.domain, id=f"{document.id}#{i}")
        for i, text in enumerate(chunks)
    ]


def _prepared_stream_data(run_dir: Path, train_path: Path) -> RunData:
    folder = train_path.parent
    for needed in (train_path, folder / VAL_FILE, folder / TOKENIZER_FILE):
        if not needed.exists():
            raise ValueError(
                f"--data {str(train_path)!r}: {str(needed)!r} is missing; "
                "make the folder with `moekit prepare`"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / TOKENIZER_FILE).exists():
        copy_tokenizer(folder, run_dir)
    return _load(run_dir / TOKENIZER_FILE, train_path, folder / VAL_FILE)


def _load(tokenizer_path: Path, train_path: Path, val_path: Path) -> RunData:
    tokenizer = Tokenizer.load(tokenizer_path)
    return RunData(
        tokenizer=tokenizer,
        train=load_stream(train_path, tokenizer=tokenizer),
        validation=load_stream(val_path, tokenizer=tokenizer),
    )
