"""The text an SAE is trained and evaluated on, as fixed-length token sequences.

The default corpus is embedded: the Python standard library's own documentation (the
``pydoc`` topic pages and the docstrings of the stdlib modules), real English prose that every
Python installation ships, so nothing is downloaded. Users with a hub can pass any Hugging Face
dataset instead.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import itertools
import pkgutil
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

import datasets
import torch
from transformers import PreTrainedTokenizerBase

DOCUMENT_SEPARATOR = "\n\n"
"""Text placed between documents when they are concatenated (no BOS/EOS inside sequences)."""

DEFAULT_DATASET_CHARS = 2_000_000
"""How much text to take from a user dataset: about the size of the embedded corpus."""

_SKIPPED_MODULES = frozenset(
    {
        "antigravity",  # opens a web browser
        "this",  # prints the Zen of Python
        "idlelib",  # GUI
        "tkinter",  # GUI
        "turtle",  # GUI
        "turtledemo",  # GUI
        "test",  # the regression test suite
        "readline",  # may write terminal control codes on import
        "distutils",  # replaced by a setuptools shim in some environments
        "lib2to3",  # grammar tables, deprecated
        "ensurepip",  # bundled wheels, no prose
        "encodings",  # codec tables, no prose
        "pydoc_data",  # already used whole, as the topic pages
    }
)
_SKIPPED_PARTS = frozenset({"test", "tests", "idle_test"})
_FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}


@dataclass(frozen=True)
class CorpusSplits:
    """Token sequences for SAE training and for evaluation; no sequence is in both.

    Each tensor is ``[n_seq, context_size]`` of token ids, BOS first when requested.
    """

    train: torch.LongTensor
    eval: torch.LongTensor


def stdlib_documents() -> list[str]:
    """The embedded corpus: pydoc topic pages, then one document of docstrings per module.

    Modules come in a fixed sorted order and repeated docstrings are kept once, so the list
    is the same on every run with the same Python.
    """
    return list(_stdlib_documents())


def tokenize_documents(
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str],
    context_size: int,
    prepend_bos: bool = True,
) -> torch.LongTensor:
    """Concatenate ``documents`` and cut them into ``[n_seq, context_size]`` token rows.

    Documents are joined by :data:`DOCUMENT_SEPARATOR`; special-token text inside
    documents is tokenised as plain text, so BOS appears only where placed. With
    ``prepend_bos`` each row starts with the tokenizer's BOS followed by
    ``context_size - 1`` text tokens. The ragged tail is dropped.
    """
    body = context_size - 1 if prepend_bos else context_size
    if body < 1:
        raise ValueError(f"context_size {context_size} leaves no room for text tokens")
    if not documents:
        raise ValueError("no evaluation tokens: the corpus has no documents")
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is None:
        raise ValueError("prepend_bos=True needs a tokenizer with a BOS token")
    encoded = tokenizer(
        list(documents),
        add_special_tokens=False,
        split_special_tokens=True,
        verbose=False,
    )["input_ids"]
    separator = tokenizer(DOCUMENT_SEPARATOR, add_special_tokens=False)["input_ids"]
    stream = torch.tensor(
        list(itertools.chain.from_iterable(_interleave(encoded, separator))), dtype=torch.long
    )
    n_seq = stream.numel() // body
    if n_seq == 0:
        raise ValueError(
            f"no evaluation tokens: {len(documents)} documents give {stream.numel()} tokens, "
            f"fewer than one sequence of {body} text tokens (context_size {context_size})"
        )
    rows = stream[: n_seq * body].view(n_seq, body)
    if prepend_bos:
        rows = torch.cat([torch.full((n_seq, 1), bos, dtype=torch.long), rows], dim=1)
    return rows


def corpus_splits(
    tokenizer: PreTrainedTokenizerBase,
    context_size: int,
    eval_fraction: float = 0.1,
    seed: int = 0,
    dataset: str | None = None,
    dataset_chars: int = DEFAULT_DATASET_CHARS,
) -> CorpusSplits:
    """Tokenised corpus split into disjoint training and evaluation sequences.

    The sequence order is shuffled with a generator seeded by ``seed``; the first
    ``eval_fraction`` of it (at least one sequence) is for evaluation, the rest for training.
    ``dataset=None`` uses the embedded stdlib documentation; otherwise ``dataset`` is a
    Hugging Face dataset name or a local path, of which ``dataset_chars`` characters are read.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be between 0 and 1, got {eval_fraction}")
    documents = stdlib_documents() if dataset is None else dataset_documents(dataset, dataset_chars)
    tokens = tokenize_documents(tokenizer, documents, context_size)
    n_seq = tokens.shape[0]
    n_eval = max(1, round(n_seq * eval_fraction))
    if n_eval >= n_seq:
        raise ValueError(
            f"no training tokens: {n_seq} sequence(s) of {context_size} tokens all go to "
            f"evaluation at eval_fraction={eval_fraction}; use more text or a smaller context_size"
        )
    order = torch.randperm(n_seq, generator=torch.Generator().manual_seed(seed))
    return CorpusSplits(train=tokens[order[n_eval:]], eval=tokens[order[:n_eval]])


def dataset_documents(dataset: str, max_chars: int = DEFAULT_DATASET_CHARS) -> list[str]:
    """Documents from a Hugging Face dataset or local data file, up to ``max_chars`` in total.

    The dataset is streamed (split ``train``) and read from its ``text`` column, or its first
    string column.
    """
    try:
        rows = _stream_dataset(dataset)
        documents: list[str] = []
        total = 0
        for row in rows:
            text = _row_text(row)
            if not text:
                continue
            documents.append(text)
            total += len(text)
            if total >= max_chars:
                break
    except Exception as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ValueError(
            f"cannot load dataset {dataset!r} ({type(exc).__name__}: {reason}); "
            "offline use needs dataset=None (the embedded stdlib docs)"
        ) from exc
    return documents


def as_hf_dataset(tokens: torch.LongTensor) -> datasets.Dataset:
    """Pre-tokenised rows as a ``datasets.Dataset`` with one ``input_ids`` column.

    SAELens's activation store treats a dataset with an ``input_ids`` (or ``tokens``)
    column as already tokenised and uses each row as one context, so this can be passed as
    ``override_dataset`` to ``LanguageModelSAETrainingRunner``.
    """
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(
            f"no evaluation tokens: expected a non-empty [n_seq, context_size] tensor, "
            f"got shape {tuple(tokens.shape)}"
        )
    return datasets.Dataset.from_dict({"input_ids": tokens.tolist()})


def _interleave(encoded: Sequence[list[int]], separator: list[int]) -> Iterator[list[int]]:
    """Each document's tokens, with the separator tokens between consecutive documents."""
    for index, ids in enumerate(encoded):
        if index:
            yield separator
        yield ids


@cache
def _stdlib_documents() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    pages = [topics[key] for key in sorted(topics)]
    seen: set[str] = set(pages)
    module_docs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in _stdlib_modules(sorted(sys.stdlib_module_names)):
            parts = [doc for doc in _module_docstrings(module) if doc not in seen]
            seen.update(parts)
            if parts:
                module_docs.append("\n\n".join(parts))
    return tuple(pages + module_docs)


def _stdlib_modules(names: Sequence[str]) -> Iterator[ModuleType]:
    """Import public stdlib modules and their submodules, depth first in sorted order."""
    for name in names:
        if _skipped(name):
            continue
        module = _quiet_import(name)
        if module is None:
            continue
        yield module
        if hasattr(module, "__path__"):
            children = sorted(
                f"{name}.{info.name}" for info in pkgutil.iter_modules(module.__path__)
            )
            yield from _stdlib_modules(children)


def _skipped(name: str) -> bool:
    parts = name.split(".")
    return parts[0] in _SKIPPED_MODULES or any(
        part.startswith("_") or part in _SKIPPED_PARTS for part in parts
    )


def _quiet_import(name: str) -> ModuleType | None:
    """Import ``name`` with its output and warnings swallowed; None if it cannot import here."""
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            return importlib.import_module(name)
    except Exception:
        return None


def _module_docstrings(module: ModuleType) -> Iterator[str]:
    """The module's docstring, then those of its public classes, functions and methods."""
    yield from _own_doc(module)
    for key, value in sorted(vars(module).items()):
        if module is sys:
            # sys's hooks are replaced at run time (pytest's unraisablehook, IPython's
            # displayhook/excepthook): document the originals, so the corpus is the same there
            value = getattr(sys, f"__{key}__", value)
        if key.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isroutine(value):
            yield from _own_doc(value)
        elif inspect.isclass(value):
            yield from _own_doc(value)
            for member_name, member in sorted(vars(value).items()):
                if not member_name.startswith("_") and (
                    inspect.isroutine(member) or isinstance(member, property)
                ):
                    yield from _own_doc(member)


def _own_doc(obj: object) -> Iterator[str]:
    """The object's own docstring (not an inherited one), dedented, if it has any text."""
    doc = getattr(obj, "__doc__", None)
    if isinstance(doc, str) and doc.strip():
        yield inspect.cleandoc(doc)


def _stream_dataset(dataset: str) -> Iterator[dict]:
    """Stream the ``train`` split of a hub dataset, a local dataset folder or a data file."""
    path = Path(dataset).expanduser()
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower(), "text")
        return iter(
            datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
        )
    if not path.exists():
        from csae_plugin.models import hub_usable

        if not hub_usable():
            raise ConnectionError("not a local path and the Hugging Face hub is not reachable")
    return iter(datasets.load_dataset(str(dataset), split="train", streaming=True))


def _row_text(row: dict) -> str:
    """The text of one dataset row: its ``text`` column, else its first string column."""
    if isinstance(row.get("text"), str):
        return row["text"]
    return next((value for value in row.values() if isinstance(value, str)), "")
