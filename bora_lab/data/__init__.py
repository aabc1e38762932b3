"""Offline datasets shipped with BoRA Lab, loaded as Hugging Face ``datasets``.

The parquet files next to this module are built by ``scripts/build_offline_data.py`` from
Debian packages (see ``PROVENANCE.md``). Nothing here touches the network, so every loader
works with ``HF_HUB_OFFLINE=1``; all of them go through ``datasets.Dataset.from_pandas`` so the
training pipeline is the same as for hub data. ``datasets`` is imported lazily and torch never,
so the UI can import this module cheaply.

Datasets:

* ``load_fine_foods()``: Amazon fine-food reviews, binary "5 stars or not" (4,000 / 1,000).
* ``load_austen_lm()``: Jane Austen paragraphs for causal-LM fine-tuning.
* ``load_austen_books()``: 6-class "which novel is this paragraph from".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # imported lazily at run time (``import datasets`` takes about a second)
    import datasets

DATA_DIR: Path = Path(__file__).resolve().parent
FINE_FOODS_LABELS: tuple[str, ...] = ("other", "great")  # label 0 = 1-4 stars, 1 = 5 stars
AUSTEN_BOOKS: tuple[str, ...] = (  # order of janeaustenr::austen_books(); label ids follow it
    "Sense & Sensibility",
    "Pride & Prejudice",
    "Mansfield Park",
    "Emma",
    "Northanger Abbey",
    "Persuasion",
)
_BUILD_HINT = "run `python scripts/build_offline_data.py` to rebuild the offline data"


def _read_parquet(name: str) -> pd.DataFrame:
    """Read one shipped parquet file, with a helpful error if it is missing."""
    path = DATA_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {_BUILD_HINT}")
    return pd.read_parquet(path)


def _to_dataset(frame: pd.DataFrame, features: datasets.Features) -> datasets.Dataset:
    """``Dataset.from_pandas`` with explicit features and no index column."""
    import datasets

    frame = frame.reset_index(drop=True)[list(features)]
    return datasets.Dataset.from_pandas(frame, features=features, preserve_index=False)


def load_fine_foods() -> datasets.DatasetDict:
    """Amazon fine-food reviews (SNAP, via R ``modeldata::small_fine_foods``).

    Returns:
        ``DatasetDict`` with splits ``train`` (4,000 rows: 2,600 great / 1,400 other) and
        ``test`` (1,000 rows: 658 / 342), columns ``text`` (the review) and ``label``
        (``ClassLabel`` with names ``["other", "great"]``; great = a 5-star review).
    """
    import datasets

    label = datasets.ClassLabel(names=list(FINE_FOODS_LABELS))
    features = datasets.Features({"text": datasets.Value("string"), "label": label})
    return datasets.DatasetDict(
        {
            split: _to_dataset(_read_parquet(f"fine_foods_{split}.parquet"), features)
            for split in ("train", "test")
        }
    )


def austen_paragraphs() -> pd.DataFrame:
    """The six novels as paragraphs: consecutive non-blank lines joined with single spaces.

    Runs of whitespace inside a paragraph (Gutenberg's two spaces after a full stop) are
    collapsed to one space.

    Returns:
        Frame with columns ``book`` (title), ``position`` (paragraph index within its book)
        and ``text``, in reading order (books in ``AUSTEN_BOOKS`` order). About 10.3k rows.
    """
    lines = _read_parquet("austen.parquet")
    rows: list[tuple[str, int, str]] = []
    for book in AUSTEN_BOOKS:
        current: list[str] = []
        position = 0
        # A trailing "" flushes the last paragraph of the book.
        for line in [*lines.loc[lines["book"] == book, "text"].tolist(), ""]:
            line = line.strip()
            if line:
                current.append(line)
            elif current:
                rows.append((book, position, " ".join(" ".join(current).split())))
                position += 1
                current = []
    return pd.DataFrame(rows, columns=["book", "position", "text"])


def _split_long(text: str, block_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``block_chars`` characters, at spaces when possible."""
    pieces = []
    while len(text) > block_chars:
        cut = text.rfind(" ", 0, block_chars + 1)
        if cut <= 0:  # a single word longer than the block: hard cut
            cut = block_chars
        pieces.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    if text:
        pieces.append(text)
    return pieces


def _pack(paragraphs: Sequence[str], block_chars: int) -> list[str]:
    """Greedily pack paragraphs (joined by a blank line) into blocks of <= ``block_chars``."""
    blocks: list[str] = []
    current = ""
    for paragraph in paragraphs:
        for piece in _split_long(paragraph, block_chars):
            candidate = f"{current}\n\n{piece}" if current else piece
            if len(candidate) <= block_chars:
                current = candidate
            else:
                blocks.append(current)
                current = piece
    if current:
        blocks.append(current)
    return blocks


def load_austen_lm(
    block_chars: int | None = None,
    test_fraction: float = 0.05,
    books: Sequence[str] | None = None,
) -> datasets.DatasetDict:
    """Jane Austen's novels for causal-LM fine-tuning.

    The split is deterministic and by position: the last ``test_fraction`` of each book's
    paragraphs (at least one) is the test set, so test text is never seen in training.

    Args:
        block_chars: If ``None``, one row per paragraph. Otherwise consecutive paragraphs of
            the same book and split are packed, separated by a blank line (``"\\n\\n"``), into
            rows of at most ``block_chars`` characters; longer paragraphs are cut at spaces.
        test_fraction: Fraction of each book's paragraphs (taken from its end) used for test.
        books: Titles from ``AUSTEN_BOOKS`` to keep (e.g. ``["Pride & Prejudice"]``);
            ``None`` keeps all six.

    Returns:
        ``DatasetDict`` with splits ``train`` and ``test`` and a single column ``text``.

    Raises:
        ValueError: On an unknown title, ``block_chars < 1`` or ``test_fraction`` outside (0, 1).
    """
    import datasets

    if block_chars is not None and block_chars < 1:
        raise ValueError(f"block_chars must be >= 1, got {block_chars}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    selected = list(AUSTEN_BOOKS) if books is None else list(books)
    unknown = sorted(set(selected) - set(AUSTEN_BOOKS))
    if unknown:
        raise ValueError(f"unknown books {unknown}; choose from {list(AUSTEN_BOOKS)}")

    paragraphs = austen_paragraphs()
    texts: dict[str, list[str]] = {"train": [], "test": []}
    for book in AUSTEN_BOOKS:
        if book not in selected:
            continue
        book_texts = paragraphs.loc[paragraphs["book"] == book, "text"].tolist()
        n_test = max(1, math.ceil(test_fraction * len(book_texts)))
        parts = {"train": book_texts[:-n_test], "test": book_texts[-n_test:]}
        for split, part in parts.items():
            texts[split].extend(part if block_chars is None else _pack(part, block_chars))

    features = datasets.Features({"text": datasets.Value("string")})
    return datasets.DatasetDict(
        {split: _to_dataset(pd.DataFrame({"text": t}), features) for split, t in texts.items()}
    )


def load_austen_books(
    min_chars: int = 100,
    max_train_per_class: int = 1000,
    max_test_per_class: int = 200,
    seed: int = 0,
) -> datasets.DatasetDict:
    """6-class "which Jane Austen novel is this paragraph from?".

    Paragraphs shorter than ``min_chars`` (chapter headings, one-line replies) are dropped.
    Per book, a seeded shuffle assigns ``min(max_test_per_class, n // 3)`` paragraphs to test
    and up to ``max_train_per_class`` of the rest to train. With the defaults the test set is
    balanced (200 per book) and train has 1,000 per book except *Northanger Abbey* (506) and
    *Persuasion* (684), which have fewer long paragraphs. Both splits are then shuffled with
    the same seed so classes are interleaved. Character names make the task fairly easy.

    Args:
        min_chars: Minimum paragraph length in characters.
        max_train_per_class: Cap on training paragraphs per book.
        max_test_per_class: Cap on test paragraphs per book.
        seed: Seed of the split and of the shuffles; same seed, same datasets.

    Returns:
        ``DatasetDict`` with splits ``train`` and ``test``, columns ``text`` (a paragraph) and
        ``label`` (``ClassLabel`` whose names are ``AUSTEN_BOOKS``).
    """
    import datasets

    paragraphs = austen_paragraphs()
    paragraphs = paragraphs[paragraphs["text"].str.len() >= min_chars]
    rng = np.random.default_rng(seed)
    chosen: dict[str, list[pd.DataFrame]] = {"train": [], "test": []}
    for label, book in enumerate(AUSTEN_BOOKS):
        rows = paragraphs[paragraphs["book"] == book].assign(label=label)
        order = rng.permutation(len(rows))
        n_test = min(max_test_per_class, len(rows) // 3)
        chosen["test"].append(rows.iloc[order[:n_test]])
        chosen["train"].append(rows.iloc[order[n_test : n_test + max_train_per_class]])

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(AUSTEN_BOOKS))}
    )
    splits = {}
    for split, frames in chosen.items():
        frame = pd.concat(frames).sample(frac=1.0, random_state=seed)  # interleave classes
        splits[split] = _to_dataset(frame, features)
    return datasets.DatasetDict(splits)

