"""Tasks and metrics: every metric against a hand computation, the registry, column mapping."""
from __future__ import annotations

import math

import pytest
import torch

from bora_lab.config import RunConfig
from bora_lab.engine import metrics as M
from bora_lab.engine import tasks as T
from bora_lab.engine.synthetic import changed_weight

# ---------------------------------------------------------------- metrics by hand
# preds/labels: tp at 0, 3, 5; fp at 2; fn at 6; tn at 1, 4, 7
P2 = [1, 0, 1, 1, 0, 1, 0, 0]
L2 = [1, 0, 0, 1, 0, 1, 1, 0]
# 3 classes: correct at 0, 1, 2, 4 (c = 4 of s = 6); preds per class 2,2,2; labels per class 1,3,2
P3 = [0, 1, 2, 2, 1, 0]
L3 = [0, 1, 2, 1, 1, 2]


def test_accuracy_by_hand():
    assert M.accuracy(P2, L2) == 6 / 8
    assert M.accuracy(P3, L3) == 4 / 6
    assert M.accuracy([], []) == 0.0


def test_f1_by_hand():
    assert M.f1(P2, L2) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))  # 2tp / (2tp + fp + fn) = 0.75
    # class 0: tp 1, fp 1, fn 0 -> 2/3; class 1: tp 2, fp 0, fn 1 -> 4/5; class 2: tp 1, fp 1, fn 1 -> 1/2
    assert M.f1(P3, L3, average="macro") == pytest.approx((2 / 3 + 4 / 5 + 1 / 2) / 3)
    assert M.f1([0, 0], [0, 0]) == 0.0  # no positives at all: defined as 0
    with pytest.raises(ValueError):
        M.f1(P2, L2, average="micro")


def test_matthews_by_hand():
    # binary: (tp·tn − fp·fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (9 − 1) / sqrt(4·4·4·4) = 0.5
    assert M.matthews(P2, L2) == pytest.approx(0.5)
    # multiclass: (c·s − Σ p_k t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²)) = (24 − 12) / sqrt(24 · 22)
    assert M.matthews(P3, L3) == pytest.approx(12 / math.sqrt(24 * 22))
    assert M.matthews([1, 1, 1], [0, 1, 0]) == 0.0  # constant prediction: undefined -> 0
    assert M.matthews(L2, L2) == pytest.approx(1.0)


def test_pearson_spearman_by_hand():
    # dx = [-1.5, -.5, .5, 1.5], dy = [-3, -1, 0, 4]: Σdxdy = 11, Σdx² = 5, Σdy² = 26
    assert M.pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(5 * 26))
    # ties: ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4] -> 4.5 / sqrt(4.5 · 5)
    assert M.rankdata([1, 2, 2, 3]).tolist() == [1, 2.5, 2.5, 4]
    assert M.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert M.pearson([1, 1, 1], [1, 2, 3]) == 0.0
    r = M.regression_metrics([1, 2, 2, 3], [1, 3, 2, 4])
    assert r["pearson_spearman"] == pytest.approx((r["pearson"] + r["spearman"]) / 2)


def test_perplexity_by_hand():
    assert M.perplexity(6.0, 3) == pytest.approx(math.exp(2.0))
    assert math.isnan(M.perplexity(1.0, 0))


def test_metrics_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (50,), generator=g).float().tolist()  # many ties
    y = (torch.tensor(x) + torch.randn(50, generator=g)).tolist()
    assert M.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert M.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
    assert M.rankdata(x).tolist() == stats.rankdata(x).tolist()


def test_shape_mismatch():
    with pytest.raises(ValueError):
        M.accuracy([1, 0], [1])


# ---------------------------------------------------------------- registry
def test_registry_lists_offline_and_glue():
    offline = T.available_tasks(online=False)
    for name in ("fine_foods", "austen_books", "austen_lm", "synthetic_row", "synthetic_col", "synthetic_rank",
                 "synthetic_mix"):
        assert name in offline
    assert all(f"glue/{g}" in T.TASKS for g in ("cola", "sst2", "mrpc", "rte", "stsb", "qnli", "qqp", "mnli"))
    assert T.get_task_spec("glue/cola").online and not T.get_task_spec("fine_foods").online
    assert T.TASKS["glue/cola"].loader is not None
    assert T.task_defaults("synthetic_col")["lr"] == T.SYNTHETIC_DEFAULTS["lr"]
    assert T.task_defaults("austen_lm")["model"] == "smollm2"


def test_glue_metrics_are_right():
    assert T.GLUE["cola"][3] == "matthews"
    assert T.GLUE["stsb"][1] == 1 and T.GLUE["stsb"][3] == "pearson"
    assert T.GLUE["mnli"][1] == 3 and T.GLUE["mnli"][4] == "validation_matched"
    cola = T.Task("glue/cola", "classification", "matthews", num_labels=2, metrics=("matthews", "accuracy"))
    assert cola.score(P2, L2) == {"matthews": pytest.approx(0.5), "accuracy": 0.75}
    stsb = T.Task("glue/stsb", "regression", "pearson", num_labels=1, metrics=())
    assert set(stsb.score([1.0, 2.0, 3.0], [1.0, 2.5, 2.9])) == {"pearson", "spearman", "pearson_spearman"}


@pytest.mark.parametrize("name", ["glue/cola", "not_a_task_xyz"])
def test_online_tasks_offline_give_one_line(name):
    with pytest.raises(ValueError) as err:
        T.load_task(RunConfig(task=name))
    msg = str(err.value)
    assert "\n" not in msg and "fine_foods" in msg  # names the offline choices


def test_unknown_glue_name():
    with pytest.raises(ValueError, match="choose one of: glue/cola"):
        T.get_task_spec("glue/nope")


def test_fine_foods_task():
    task = T.load_task(RunConfig())
    assert task.kind == "classification" and task.metric == "accuracy" and task.num_labels == 2
    assert len(task.train) == 4000 and len(task.test) == 1000
    assert set(task.train.column_names) == {"text", "label"}


def test_austen_tasks():
    books = T.load_task(RunConfig(task="austen_books"))
    assert books.num_labels == 6 and len(books.label_names) == 6
    lm = T.load_task(RunConfig(task="austen_lm", max_length=64))
    assert lm.kind == "causal_lm" and lm.metric == "perplexity" and not lm.higher_is_better
    assert lm.train.column_names == ["text"] and max(len(t) for t in lm.train["text"][:200]) <= 256


# ---------------------------------------------------------------- any HF dataset: column mapping
def _fake_hub(monkeypatch, columns: dict):
    import datasets

    ds = datasets.Dataset.from_dict(columns)
    monkeypatch.setattr(T, "_load_hub_dataset", lambda *a, **k: datasets.DatasetDict({"train": ds, "test": ds}))


def test_hub_dataset_auto_columns(monkeypatch):
    _fake_hub(monkeypatch, {"sentence": ["a", "b", "c"], "label": [0, 1, 2], "idx": [0, 1, 2]})
    task = T.load_task(RunConfig(task="someone/three_class"))
    assert task.kind == "classification" and task.num_labels == 3
    assert task.train.column_names == ["text", "label"]


def test_hub_dataset_mapping_and_lm(monkeypatch):
    _fake_hub(monkeypatch, {"body": ["a", "b"], "stars": [0.5, 1.5]})
    reg = T.load_task(RunConfig(task="x/y", text_column="body", label_column="stars"))
    assert reg.kind == "regression" and reg.metric == "pearson"
    lm = T.load_task(RunConfig(task="x/y", text_column="body"))
    assert lm.kind == "causal_lm" and lm.train.column_names == ["text"]


def test_hub_dataset_missing_columns_lists_them(monkeypatch):
    _fake_hub(monkeypatch, {"body": ["a", "b"], "stars": [0, 1]})
    with pytest.raises(ValueError, match="columns: body, stars"):
        T.load_task(RunConfig(task="x/y"))  # no text column found
    with pytest.raises(ValueError, match="no label column 'rating'; columns: body, stars"):
        T.load_task(RunConfig(task="x/y", text_column="body", label_column="rating"))


# ---------------------------------------------------------------- synthetic targets
def test_synthetic_changes_have_the_promised_form():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(12, 16, generator=g)
    col = changed_weight(w0, "col", g) / w0  # every column scaled by one number
    assert torch.allclose(col, col[0].expand_as(col), atol=1e-5)
    row = changed_weight(w0, "row", g) / w0  # every row scaled by one number
    assert torch.allclose(row, row[:, :1].expand_as(row), atol=1e-5)
    assert torch.linalg.matrix_rank(changed_weight(w0, "rank", g) - w0) == 4
    assert not torch.allclose(changed_weight(w0, "mix", g), w0)
    with pytest.raises(ValueError):
        changed_weight(w0, "diag", g)
