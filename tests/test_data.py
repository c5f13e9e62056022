"""Tests for the embedded corpus and its tokenisation (csae_plugin.data).

Fast tests use a small BPE tokenizer trained in-process on stdlib docs (no hub); the one
slow test tokenises the whole corpus with the real Gemma 3 tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from sae_lens.training.activations_store import ActivationsStore
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformer_lens import HookedTransformer
from transformers import PreTrainedTokenizerFast

from csae_plugin import data

CONTEXT = 64


@pytest.fixture(scope="module")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A 400-token byte-level BPE tokenizer with a <bos> token, trained on stdlib docs."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(data.stdlib_documents()[:30], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", unk_token="<unk>")


def _stream(tokenizer: PreTrainedTokenizerFast, documents: list[str]) -> list[int]:
    """Reference concatenation: each document's tokens, separator tokens in between."""
    separator = tokenizer.encode(data.DOCUMENT_SEPARATOR, add_special_tokens=False)
    stream: list[int] = []
    for index, document in enumerate(documents):
        if index:
            stream += separator
        stream += tokenizer.encode(document, add_special_tokens=False)
    return stream


def test_1_stdlib_corpus_is_large_and_deterministic() -> None:
    documents = data.stdlib_documents()
    assert len(documents) > 300
    assert sum(map(len, documents)) > 1_000_000
    assert all(isinstance(doc, str) and doc.strip() for doc in documents)
    assert data._stdlib_documents.__wrapped__() == tuple(documents)


def test_2_rows_are_the_concatenated_stream_with_bos_first(
    bpe_tokenizer: PreTrainedTokenizerFast,
) -> None:
    documents = data.stdlib_documents()[:20]
    tokens = data.tokenize_documents(bpe_tokenizer, documents, CONTEXT)
    stream = _stream(bpe_tokenizer, documents)
    n_seq = len(stream) // (CONTEXT - 1)
    bos = bpe_tokenizer.bos_token_id
    assert tokens.dtype == torch.long
    assert tokens.shape == (n_seq, CONTEXT)
    assert (tokens[:, 0] == bos).all()
    assert not (tokens[:, 1:] == bos).any()
    assert tokens[:, 1:].flatten().tolist() == stream[: n_seq * (CONTEXT - 1)]


def test_3_without_bos_rows_are_plain_text_tokens(bpe_tokenizer: PreTrainedTokenizerFast) -> None:
    documents = data.stdlib_documents()[:20]
    tokens = data.tokenize_documents(bpe_tokenizer, documents, CONTEXT, prepend_bos=False)
    stream = _stream(bpe_tokenizer, documents)
    assert tokens.shape == (len(stream) // CONTEXT, CONTEXT)
    assert tokens.flatten().tolist() == stream[: tokens.numel()]


def test_4_bos_text_inside_a_document_is_not_a_bos_token(
    bpe_tokenizer: PreTrainedTokenizerFast,
) -> None:
    tokens = data.tokenize_documents(bpe_tokenizer, ["see <bos> here " * 40], 16)
    assert not (tokens[:, 1:] == bpe_tokenizer.bos_token_id).any()


def test_5_splits_are_disjoint_complete_and_seeded(bpe_tokenizer: PreTrainedTokenizerFast) -> None:
    splits = data.corpus_splits(bpe_tokenizer, CONTEXT, eval_fraction=0.1, seed=0)
    again = data.corpus_splits(bpe_tokenizer, CONTEXT, eval_fraction=0.1, seed=0)
    other = data.corpus_splits(bpe_tokenizer, CONTEXT, eval_fraction=0.1, seed=1)
    everything = data.tokenize_documents(bpe_tokenizer, data.stdlib_documents(), CONTEXT)

    # Every sequence lands in exactly one split. The docs repeat some passages, so a few
    # sequences have identical twins; only those may show up on both sides.
    all_rows = Counter(tuple(row) for row in everything.tolist())
    train_rows = [tuple(row) for row in splits.train.tolist()]
    eval_rows = [tuple(row) for row in splits.eval.tolist()]
    assert Counter(train_rows + eval_rows) == all_rows
    assert all(all_rows[row] > 1 for row in set(train_rows) & set(eval_rows))
    assert splits.eval.shape[0] == round(0.1 * everything.shape[0])
    assert torch.equal(splits.train, again.train) and torch.equal(splits.eval, again.eval)
    assert not torch.equal(splits.eval, other.eval)


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")
def test_6_hf_dataset_round_trips_and_saelens_sees_it_as_tokenised(
    bpe_tokenizer: PreTrainedTokenizerFast, tiny_model: HookedTransformer
) -> None:
    tokens = data.tokenize_documents(bpe_tokenizer, data.stdlib_documents()[:5], 16)
    dataset = data.as_hf_dataset(tokens)
    assert dataset.column_names == ["input_ids"]
    assert torch.equal(torch.tensor(dataset["input_ids"]), tokens)

    small = tokens % tiny_model.cfg.d_vocab
    store = ActivationsStore(
        model=tiny_model,
        dataset=data.as_hf_dataset(small),
        streaming=False,
        hook_name="blocks.0.hook_resid_post",
        hook_head_index=None,
        context_size=16,
        d_in=tiny_model.cfg.d_model,
        n_batches_in_buffer=2,
        total_training_tokens=small.shape[0],
        store_batch_size_prompts=4,
        train_batch_size_tokens=16,
        prepend_bos=True,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
    )
    assert store.is_dataset_tokenized and store.tokens_column == "input_ids"
    assert next(store.iterable_sequences).tolist() == small[0].tolist()


def test_7_empty_corpus_is_a_one_line_error(bpe_tokenizer: PreTrainedTokenizerFast) -> None:
    for documents in ([], ["short"]):
        with pytest.raises(ValueError, match="^no evaluation tokens: [^\n]*$"):
            data.tokenize_documents(bpe_tokenizer, documents, 128)
    with pytest.raises(ValueError, match="^no evaluation tokens"):
        data.as_hf_dataset(torch.zeros((0, 16), dtype=torch.long))


def test_8_local_dataset_file_replaces_the_embedded_corpus(
    bpe_tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    path = tmp_path / "texts.jsonl"
    rows = [{"id": i, "text": doc} for i, doc in enumerate(data.stdlib_documents()[100:140])]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    documents = data.dataset_documents(str(path), max_chars=20_000)
    assert documents == [row["text"] for row in rows[: len(documents)]]
    assert sum(map(len, documents)) >= 20_000 > sum(map(len, documents[:-1]))

    splits = data.corpus_splits(bpe_tokenizer, 32, dataset=str(path), dataset_chars=20_000)
    expected = data.tokenize_documents(bpe_tokenizer, documents, 32)
    assert splits.train.shape[0] + splits.eval.shape[0] == expected.shape[0]


def test_9_unreachable_dataset_fails_fast_with_offline_hint(
    bpe_tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("csae_plugin.models.hub_usable", lambda: False)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"^cannot load dataset .*dataset=None[^\n]*$"):
        data.corpus_splits(bpe_tokenizer, 32, dataset="no-such-user/no-such-dataset-xyz")
    assert time.perf_counter() - start < 5


@pytest.mark.slow
def test_10_whole_corpus_tokenises_quickly_with_gemma() -> None:
    from csae_plugin.models import load_embedded_hf_model

    _, tokenizer = load_embedded_hf_model()
    start = time.perf_counter()
    tokens = data.tokenize_documents(tokenizer, data.stdlib_documents(), 128)
    elapsed = time.perf_counter() - start
    assert elapsed < 30
    assert tokens.shape[1] == 128 and tokens.shape[0] > 2_000
    assert (tokens[:, 0] == tokenizer.bos_token_id).all()
    assert not (tokens[:, 1:] == tokenizer.bos_token_id).any()


def test_1b_stdlib_corpus_is_the_same_under_replaced_sys_hooks(monkeypatch) -> None:
    """pytest replaces sys.unraisablehook, IPython sys.displayhook / excepthook: the corpus
    built here must equal the one a plain ``python`` process builds (it once differed by
    sys.unraisablehook's docstring, so the CI sweep trained on other rows than the reference)."""
    script = (
        "import hashlib; from csae_plugin.data import stdlib_documents; "
        "print(hashlib.sha1('\\0'.join(stdlib_documents()).encode()).hexdigest())"
    )
    plain = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.strip()
    for hook in ("displayhook", "excepthook", "unraisablehook", "breakpointhook"):
        monkeypatch.setattr(sys, hook, lambda *args: None)
    here = hashlib.sha1("\0".join(data._stdlib_documents.__wrapped__()).encode()).hexdigest()
    assert here == plain
