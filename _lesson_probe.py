"""Temporary: run one built-in lesson and print its measured numbers (deleted after use)."""
import json, sys, time, os
import torch
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from bora_lab.teach.lessons import get_lesson, lesson_config
from bora_lab.train import compare
les = get_lesson(sys.argv[1])
overrides = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
cfg = lesson_config({**les, "settings": {**les["settings"], **overrides}})
t = time.time(); last = None
for ev in compare(cfg):
    last = ev
res, weights = last.results, last.weights
out = {"lesson": les["id"], "elapsed_s": round(time.time() - t, 1), "device": res.get("device"), "runs": []}
from bora_lab.analysis.weights import effective_rank
for r in res["runs"]:
    s = r["summary"]
    row = {k: s.get(k) for k in ("run_id", "status", "trainable_params", "trainable_pct", "final_loss", "eval_metric",
                                 "median_step_s", "peak_mem_mb", "dM_row", "dM_col", "dD_row", "dD_col",
                                 "asymmetry_ratio", "dora_slope", "dora_r")}
    row["error"] = r.get("error")
    w = weights.get(r["run_id"], {})
    if "start" in w and "end" in w:
        ranks, cols, rows_ = [], [], []
        for name in list(w["end"])[:4]:
            d = (w["end"][name].float() - w["start"][name].float())
            er = effective_rank(d)
            ranks.append((name.split(".")[-3:], round(er["effective_rank"], 1), er["rank_at_99"],
                          int((torch.tensor(er["singular_values"]) > 1e-6 * max(er["singular_values"][0], 1e-30)).sum())))
            cols.append(int((d.norm(dim=0) > 1e-8).sum())); rows_.append(int((d.norm(dim=1) > 1e-8).sum()))
        row["dW"] = {"eff_rank/rank99/nonzero_sv": ranks, "nonzero_cols": cols, "nonzero_rows": rows_}
    out["runs"].append(row)
print(json.dumps(out, default=str))
