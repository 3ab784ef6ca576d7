"""Data for language-model training: corpora, a byte-level BPE tokenizer, token streams, loaders.

    corpus = build_corpus()                                   # cached after the first call
    held_out = build_package_corpus()                         # installed packages' docs
    tokenizer = train_tokenizer(d.text for d in corpus.train)
    train_bin = prepare(corpus.train, tokenizer, "out/train.bin")
    loader = BatchLoader(load_stream(train_bin), batch_size=8, seq_len=256, seed=0)
    inputs_BL, targets_BL = loader.next_batch()

See docs/data.md for the sources and sizes of the default and the held-out corpus.
"""

from moekit.data.builtin import (
    BUILTIN_CORPORA,
    BUILTIN_PREFIX,
    build_builtin_corpus,
    builtin_corpus_name,
)
from moekit.data.corpus import (
    CORPUS_VERSION,
    DOMAINS,
    Corpus,
    CorpusConfig,
    build_corpus,
    corpus_sha256,
    default_cache_dir,
)
from moekit.data.documents import Document, load_documents, split_documents
from moekit.data.loader import BatchLoader, sequential_batches
from moekit.data.math_problems import MathProblem, generate_problems
from moekit.data.package_corpus import (
    PACKAGE_CORPUS_VERSION,
    PACKAGE_DOMAINS,
    PackageCorpusConfig,
    build_package_corpus,
)
from moekit.data.special_tokens import SPECIAL_TOKENS_FILE, SpecialTokens
from moekit.data.stream import (
    TokenStream,
    load_stream,
    prepare,
    read_stream_meta,
    tokenize_documents,
)
from moekit.data.tokenizer import (
    END_OF_DOCUMENT,
    PADDING,
    Tokenizer,
    copy_tokenizer,
    train_tokenizer,
)

__all__ = [
    "BUILTIN_CORPORA",
    "BUILTIN_PREFIX",
    "CORPUS_VERSION",
    "DOMAINS",
    "END_OF_DOCUMENT",
    "PADDING",
    "SPECIAL_TOKENS_FILE",
    "BatchLoader",
    "Corpus",
    "CorpusConfig",
    "Document",
    "MathProblem",
    "PACKAGE_CORPUS_VERSION",
    "PACKAGE_DOMAINS",
    "PackageCorpusConfig",
    "SpecialTokens",
    "TokenStream",
    "Tokenizer",
    "build_builtin_corpus",
    "build_corpus",
    "build_package_corpus",
    "builtin_corpus_name",
    "copy_tokenizer",
    "corpus_sha256",
    "default_cache_dir",
    "generate_problems",
    "load_documents",
    "load_stream",
    "prepare",
    "read_stream_meta",
    "sequential_batches",
    "split_documents",
    "tokenize_documents",
    "train_tokenizer",
]
