"""Tests for the offline datasets in ``bora_lab.data`` (no network, a few seconds in all)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from bora_lab import data

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def fine_foods():
    return data.load_fine_foods()


@pytest.fixture(scope="module")
def austen_books():
    return data.load_austen_books()


@pytest.fixture(scope="module")
def paragraphs():
    return data.austen_paragraphs()


def test_shipped_files_exist_and_are_small():
    for name in ("fine_foods_train.parquet", "fine_foods_test.parquet", "austen.parquet"):
        path = data.DATA_DIR / name
        assert path.is_file(), name
        assert path.stat().st_size < 3_000_000, name
    provenance = (data.DATA_DIR / "PROVENANCE.md").read_text(encoding="utf-8")
    for needle in ("r-cran-modeldata", "r-cran-janeaustenr", "sha256", "build_offline_data.py"):
        assert needle in provenance


def test_parquet_schemas():
    train = pd.read_parquet(data.DATA_DIR / "fine_foods_train.parquet")
    assert list(train.columns) == ["text", "label", "label_name", "product"]
    assert pd.api.types.is_integer_dtype(train["label"])
    assert ((train["label"] == 1) == (train["label_name"] == "great")).all()
    austen = pd.read_parquet(data.DATA_DIR / "austen.parquet")
    assert list(austen.columns) == ["text", "book"]
    assert len(austen) == 73_422
    assert 3_500_000 < austen["text"].str.len().sum() < 4_500_000


def test_fine_foods_sizes_and_labels(fine_foods):
    assert set(fine_foods) == {"train", "test"}
    assert fine_foods["train"].num_rows == 4000
    assert fine_foods["test"].num_rows == 1000
    label = fine_foods["train"].features["label"]
    assert isinstance(label, datasets.ClassLabel)
    assert label.names == ["other", "great"]
    assert fine_foods["train"].features["text"] == datasets.Value("string")
    assert fine_foods["train"].column_names == ["text", "label"]
    great = label.str2int("great")
    assert Counter(fine_foods["train"]["label"]) == {great: 2600, 1 - great: 1400}
    assert Counter(fine_foods["test"]["label"]) == {great: 658, 1 - great: 342}
    assert all(isinstance(t, str) and len(t) >= 20 for t in fine_foods["test"]["text"])


def test_austen_paragraphs(paragraphs):
    assert list(paragraphs["book"].unique()) == list(data.AUSTEN_BOOKS)
    assert len(paragraphs) > 9000
    assert (paragraphs["text"].str.len() > 0).all()
    assert not paragraphs["text"].str.contains("\n|  ", regex=True).any()
    pride = paragraphs[paragraphs["book"] == "Pride & Prejudice"]["text"]
    assert any(t.startswith("It is a truth universally acknowledged") for t in pride)
    assert list(pride.index) == sorted(pride.index)  # reading order kept


def test_austen_lm_split_by_position(paragraphs):
    lm = data.load_austen_lm()
    assert lm["train"].column_names == ["text"]
    n_total = lm["train"].num_rows + lm["test"].num_rows
    assert n_total == len(paragraphs)
    assert 0.04 < lm["test"].num_rows / n_total < 0.07
    # Each book's last paragraph is in test, its first in train.
    last = paragraphs.groupby("book", sort=False)["text"].last()
    assert set(last) <= set(lm["test"]["text"])
    assert paragraphs["text"].iloc[0] in set(lm["train"]["text"])
    assert sum(len(t) for t in lm["train"]["text"]) > 3_000_000


def test_austen_lm_blocks_and_books():
    lm = data.load_austen_lm(block_chars=512, books=["Persuasion"])
    lengths = [len(t) for t in lm["train"]["text"]]
    assert max(lengths) <= 512
    assert sum(lengths) / len(lengths) > 300  # packing fills the blocks
    assert lm["train"][0]["text"].startswith("Persuasion\n\nby")
    assert "Sir Walter Elliot" in lm["train"][1]["text"]
    with pytest.raises(ValueError):
        data.load_austen_lm(books=["Ulysses"])
    with pytest.raises(ValueError):
        data.load_austen_lm(block_chars=0)


def test_austen_books(austen_books):
    label = austen_books["train"].features["label"]
    assert label.names == list(data.AUSTEN_BOOKS)
    assert len(label.names) == 6
    assert austen_books["train"].column_names == ["text", "label"]
    test_counts = Counter(austen_books["test"]["label"])
    assert test_counts == {i: 200 for i in range(6)}
    train_counts = Counter(austen_books["train"]["label"])
    assert set(train_counts) == set(range(6))
    assert max(train_counts.values()) == 1000
    assert min(train_counts.values()) >= 400
    assert min(len(t) for t in austen_books["train"]["text"]) >= 100
    assert not set(austen_books["train"]["text"]) & set(austen_books["test"]["text"])
    assert len(set(austen_books["train"]["label"][:30])) > 2  # classes interleaved


def test_loaders_are_deterministic(fine_foods, austen_books):
    assert data.load_fine_foods()["test"]["text"] == fine_foods["test"]["text"]
    again = data.load_austen_books()
    assert again["train"]["text"] == austen_books["train"]["text"]
    assert again["test"]["label"] == austen_books["test"]["label"]
    other = data.load_austen_books(seed=1)
    assert other["train"]["text"] != austen_books["train"]["text"]
    assert data.load_austen_lm(block_chars=2000)["test"]["text"] == (
        data.load_austen_lm(block_chars=2000)["test"]["text"]
    )


def test_offline_import_without_torch(tmp_path):
    code = (
        "import sys; import bora_lab.data as d; assert 'torch' not in sys.modules; "
        "ds = d.load_fine_foods(); assert ds['test'].num_rows == 1000; print('ok')"
    )
    repo_root = Path(data.__file__).resolve().parents[2]
    python_path = os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")]))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path),  # an empty cache: nothing may come from a previous download
        "PYTHONPATH": python_path,
    }
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
