"""How far a task head on frozen MiniLM features can go on the fine-food reviews: the ceiling of ``head``
and ``features`` at the default budget.

    python benchmarks/linear_probe.py                 # Markdown table (about 1 min on 2 cores)

The body is frozen, so the best a head can do is the best classifier of the frozen features. This fits
that classifier exactly (L2-regularised logistic regression, L-BFGS to convergence, features
standardised) on three features of each review: the [CLS] token's last hidden state, BERT's pooler
output on it (what ``AutoModelForSequenceClassification`` feeds its classifier), and the mean over
tokens (what sentence-transformers trains MiniLM for). The L2 weight is chosen on the validation split
(200 training reviews, stratified, seed 0, as ``--val-samples 200``); accuracy is on all 1,000 test
reviews. Training sets: the first 1,200 of the other training reviews (150 steps × batch 8, what one
default run sees) and all 3,800 of them.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

L2_GRID = (1e-3, 1e-2, 1e-1)
BUDGET = 150 * 8


@torch.no_grad()
def features(model, tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """``{"cls", "pooler", "mean"}`` feature matrices of ``texts`` (frozen body, eval mode)."""
    out: dict[str, list[torch.Tensor]] = {"cls": [], "pooler": [], "mean": []}
    for i in range(0, len(texts), 64):
        batch = tokenizer(texts[i:i + 64], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        body = model.bert(**batch)
        hidden, mask = body.last_hidden_state, batch["attention_mask"].unsqueeze(-1).float()
        out["cls"].append(hidden[:, 0])
        out["pooler"].append(body.pooler_output)
        out["mean"].append((hidden * mask).sum(1) / mask.sum(1))
    return {k: torch.cat(v) for k, v in out.items()}


def fit_probe(x: torch.Tensor, y: torch.Tensor, l2: float, classes: int = 2):
    """Logistic regression ``x @ w + b`` minimising mean cross-entropy + ``l2·||w||²`` (standardised x)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")
    z = (x - mu) / sd

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda q: (((q - mu) / sd) @ w + b).argmax(1)


def accuracy(predict, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (predict(x) == y).float().mean().item()


def main(max_length: int = 40) -> None:
    from bora_lab.data import load_fine_foods
    from bora_lab.engine.loading import load_model
    from bora_lab.engine.pipeline import split_validation

    torch.manual_seed(0)
    t0 = time.perf_counter()
    loaded = load_model("minilm", "classification", num_labels=2)
    model, tok = loaded.model.eval(), loaded.tokenizer
    data = load_fine_foods()
    train_labels = list(data["train"]["label"])
    val_idx, rest = split_validation(train_labels, len(train_labels), 200, seed=0)
    texts = list(data["train"]["text"])
    y_all = torch.tensor(train_labels)
    f_train = features(model, tok, texts, max_length)
    f_test = features(model, tok, list(data["test"]["text"]), max_length)
    y_test = torch.tensor(list(data["test"]["label"]))
    majority = max(y_test.float().mean().item(), 1 - y_test.float().mean().item())
    print(f"MiniLM (6 layers, frozen), {max_length} tokens; majority class on the 1,000 test reviews: {majority:.3f}\n")
    print("| feature | training reviews | L2 (chosen on validation) | validation acc. | train acc. | test acc. |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    val = torch.as_tensor(val_idx)
    for n in (BUDGET, len(rest)):
        idx = torch.as_tensor(rest[:n])
        for name, f in f_train.items():
            fits = {l2: fit_probe(f[idx], y_all[idx], l2) for l2 in L2_GRID}
            best = max(L2_GRID, key=lambda l2: accuracy(fits[l2], f[val], y_all[val]))
            p = fits[best]
            print(f"| {name} | {n:,} | {best:g} | {accuracy(p, f[val], y_all[val]):.3f} | "
                  f"{accuracy(p, f[idx], y_all[idx]):.3f} | {accuracy(p, f_test[name], y_test):.3f} |")
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)
