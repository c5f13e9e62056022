"""Concepts for targeted probing: classes of next tokens read off the text itself (a digit, an
opening parenthesis, the first word of a sentence), and where in a token batch each is next."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

SENTENCE_END = (".", "!", "?")
"""Characters that end a sentence (a token whose text, trailing spaces removed, ends in one)."""


@dataclass(frozen=True)
class Concept:
    """A next-token class: position t is positive when ``tokens[t+1]`` is in ``token_ids``.

    With ``patterns``, t is positive only if also one pattern matches the tokens ending at
    t+1: a pattern ``(A, B, C)`` requires ``tokens[t-1] in A``, ``tokens[t] in B`` and
    ``tokens[t+1] in C``. ``token_ids`` is also the class whose probability mass is measured.
    """

    name: str
    token_ids: frozenset[int]
    patterns: tuple[tuple[frozenset[int], ...], ...] = ()

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError(f"concept {self.name!r} has no tokens")


def decoded_vocabulary(tokenizer: PreTrainedTokenizerBase) -> list[tuple[int, str]]:
    """(id, decoded text) of every token but the special ones."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    return list(zip(ids, texts, strict=True))


def vocabulary_ids(
    vocabulary: Sequence[tuple[int, str]], predicate: Callable[[str], bool]
) -> frozenset[int]:
    """Ids of the tokens of a :func:`decoded_vocabulary` whose text satisfies ``predicate``."""
    return frozenset(i for i, text in vocabulary if predicate(text))


def default_concepts(tokenizer: PreTrainedTokenizerBase) -> list[Concept]:
    """Six concepts frequent in the embedded stdlib-documentation corpus (how often each
    occurs there: ``evals/REPORT.md``, "Targeted probing").

    * ``digit``: the next token is a number (its text, stripped, is all digits). Gemma splits
      numbers into single digits, so this includes continuing a number.
    * ``code_paren``: the next token starts with ``(`` with no space before it, i.e. a call or
      signature in code (``f(x)``, ``()``); prose parentheses `` (`` are left out.
    * ``sentence_start``: the next token begins a sentence, i.e. starts with an uppercase
      letter after sentence-final punctuation. The stdlib docs put two spaces after a period,
      which Gemma tokenizes ``.`` ``"  "`` ``The``, so two patterns: (end, `` X``) and
      (end, spaces, ``X``); the mass is over both kinds of capitalised token. A capital
      glued to a period (``io.BytesIO``) is not a sentence start and is not labelled.
    * ``close_paren``: the next token starts with ``)`` (closing a call or an aside).
    * ``comma``: the next token is a comma (its text, stripped, is ``,``).
    * ``attribute``: the next token is a name glued to a ``.`` (``os.path``, ``io.BytesIO``):
      a token starting with a letter or ``_`` right after a token that is exactly ``.``.
    """
    vocabulary = decoded_vocabulary(tokenizer)
    digit = vocabulary_ids(vocabulary, lambda s: s.strip() != "" and s.strip().isdigit())
    paren = vocabulary_ids(vocabulary, lambda s: s.startswith("("))
    spaced_upper = vocabulary_ids(vocabulary, lambda s: re.match(r" +[A-Z]", s) is not None)
    glued_upper = vocabulary_ids(vocabulary, lambda s: re.match(r"[A-Z]", s) is not None)
    end = vocabulary_ids(
        vocabulary, lambda s: s.strip() != "" and s.rstrip(" ").endswith(SENTENCE_END)
    )
    spaces = vocabulary_ids(vocabulary, lambda s: s != "" and set(s) == {" "})
    close = vocabulary_ids(vocabulary, lambda s: s.startswith(")"))
    comma = vocabulary_ids(vocabulary, lambda s: s.strip() == ",")
    dot = vocabulary_ids(vocabulary, lambda s: s == ".")
    glued_name = vocabulary_ids(vocabulary, lambda s: re.match(r"[A-Za-z_]", s) is not None)
    return [
        Concept("digit", digit),
        Concept("code_paren", paren),
        Concept(
            "sentence_start",
            spaced_upper | glued_upper,
            patterns=((end, spaced_upper), (end, spaces, glued_upper)),
        ),
        Concept("close_paren", close),
        Concept("comma", comma),
        Concept("attribute", glued_name, patterns=((dot, glued_name),)),
    ]


def scored_positions(tokens: torch.Tensor, bos_token_id: int | None) -> torch.Tensor:
    """Positions that get a label [n, T]: not the last one, and not a BOS token."""
    scored = torch.zeros_like(tokens, dtype=torch.bool)
    scored[:, :-1] = True
    if bos_token_id is not None:
        scored &= tokens != bos_token_id
    return scored


def concept_positions(
    tokens: torch.Tensor, concept: Concept, bos_token_id: int | None
) -> torch.Tensor:
    """Positive positions of ``concept`` in ``tokens`` [n, T] (bool, [n, T])."""
    n_ctx = tokens.shape[1]
    positive = torch.zeros_like(tokens, dtype=torch.bool)
    positive[:, :-1] = _member(concept.token_ids, tokens[:, 1:])
    if concept.patterns:
        matched = torch.zeros_like(positive)
        for pattern in concept.patterns:
            width = len(pattern)
            first = max(width - 2, 0)  # earliest t whose window starts at a token
            hit = torch.ones_like(positive[:, first : n_ctx - 1])
            for j, allowed in enumerate(pattern):  # the window's j-th token is t + 2 - width + j
                offset = first + 2 - width + j
                hit &= _member(allowed, tokens[:, offset : offset + hit.shape[1]])
            matched[:, first : n_ctx - 1] |= hit
        positive &= matched
    return positive & scored_positions(tokens, bos_token_id)


def _member(ids: frozenset[int], tokens: torch.Tensor) -> torch.Tensor:
    """Whether each token id is in ``ids`` (a lookup table, faster than ``isin`` on 50k ids)."""
    size = max(max(ids, default=-1), int(tokens.max()) if tokens.numel() else 0) + 1
    table = torch.zeros(size, dtype=torch.bool, device=tokens.device)
    if ids:
        table[torch.tensor(sorted(ids), device=tokens.device)] = True
    return table[tokens]
