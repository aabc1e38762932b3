"""Paper claims: the catalogue's schema, the exact counting claims end to end (Param% of Llama-2-7B on the
meta device), one training claim on a tiny budget, the verdict rules, the command and the app's view."""
from __future__ import annotations

import copy
import json
import threading

import pytest

from bora_lab.teach import claims
from bora_lab.teach.claims import training

@pytest.fixture(autouse=True)
def claims_cache(tmp_path, monkeypatch):
    """Training claims keep their comparison in a cache folder: a temporary one here."""
    monkeypatch.setenv("BORA_LAB_CLAIMS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


TINY = {"num_layers": 2, "steps": 4, "eval_every": 2, "eval_samples": 16, "analyze_every": 2, "max_length": 24,
        "batch_size": 4, "num_threads": 1}


def test_catalogue_is_valid_and_complete():
    cat = claims.catalogue()
    ids = [c["id"] for c in cat]
    assert len(ids) == len(set(ids)) >= 11
    kinds = {c["experiment"]["kind"] for c in cat}
    assert kinds == set(claims.KINDS)  # every kind of experiment is used by some claim
    for c in cat:
        assert c["paper"]["title"] and c["claim"].strip() and c["where"].strip()
        assert "seed" not in json.dumps(c).lower().replace("seeds", "")  # cites papers, never source files
        if c["experiment"]["kind"] in claims.TRAINING:
            cfg = training.claim_config(c)
            assert len(cfg.run_plan()) == len(cfg.run_specs()) >= 2


@pytest.mark.parametrize("change, needle", [
    (lambda c: c.pop("claim"), "'claim' is missing"),
    (lambda c: c.update(order="1"), "'order' must be int"),
    (lambda c: c["experiment"].update(kind="vibes"), "experiment.kind"),
    (lambda c: c["experiment"]["settings"].update(ranks=[0]), "not a valid comparison"),
    (lambda c: c["experiment"].update(seeds=[]), "list of 'seeds'"),
    (lambda c: c["paper"].pop("arxiv"), "paper.arxiv"),
    (lambda c: c.update(schema_version=2), "schema_version"),
])
def test_bad_catalogue_entries_name_the_field(change, needle):
    entry = copy.deepcopy(claims.get_claim("bora-asymmetry"))
    change(entry)
    with pytest.raises(claims.ClaimError, match=needle.replace("(", r"\(")):
        claims.validate_claim(entry)


def test_param_percent_of_llama2_7b_on_the_meta_device():
    """BoRA paper tables 1, 3, 4, 5, counted exactly on Llama-2-7B's shapes with no weights."""
    rec = claims.reproduce("bora-param-percent")
    rows = {r["label"]: r for r in rec["rows"]}
    lora = rows["LoRA r=64 (table 1)"]["ours"]
    assert lora["trainable"] == 32 * 64 * (5 * 4096 + 2 * 11008 + 4 * 4096 + 11008 + 2 * 4096)  # 7 layers' (in + out)
    assert lora["total"] == 6_738_415_616 + lora["trainable"]
    assert round(rows["BoRA r=64 (table 1)"]["ours"]["value"], 2) == 2.35
    assert round(rows["AsyLoRA* r=64 (table 1)"]["ours"]["value"], 2) == 1.26  # frozen A counts in the total
    assert [r["label"] for r in rec["rows"] if r["verdict"] != "reproduced"] == ["MoRA r=64 (table 1)"]
    assert rec["verdict"] == "partly reproduced" and "LoRA's figure" in rec["explanation"]
    assert rec["claim_hash"] == claims.claim_hash(claims.get_claim("bora-param-percent"))


def test_other_counting_claims():
    lora2 = {r["label"]: r["ours"]["params"] for r in claims.reproduce("lora2-params")["rows"]}
    assert lora2["LoRA r=8"] == 1_327_104  # DeBERTaV3-base, 6 linears x 12 layers
    assert lora2["LoRA2 k=8"] - lora2["LoRA r=8"] == 72 * (2 * 8 * 8 + 8)
    share = claims.reproduce("lora2-sensitivity")["rows"][0]["ours"]
    assert share["skipped"] == 1_327_104 and share["value"] == pytest.approx(100 * 1_327_104 / (1_327_104 + share["scored"]), abs=0.01)
    mem = {r["label"]: r["ours"]["value"] for r in claims.reproduce("qlora-memory")["rows"]}
    assert mem["full fine-tuning (GB)"] == pytest.approx(128.0, rel=1e-3)
    assert 4.0 < mem["QLoRA (GB)"] < 5.0


def test_combine_verdicts():
    assert claims.combine(["reproduced", "reproduced"]) == "reproduced"
    assert claims.combine(["reproduced", "opposite"]) == "partly reproduced"
    assert claims.combine(["opposite", "not reproduced at this scale"]) == "opposite"
    assert claims.combine(["not reproduced at this scale"] * 2) == "not reproduced at this scale"


def _results(diffs: dict[str, list[float]], steps: dict[str, list[float]] | None = None) -> dict:
    runs = []
    for method, values in diffs.items():
        for seed, v in enumerate(values):
            runs.append({"run_id": f"{method}-s{seed}", "method": method, "rank": 8, "seed": seed, "status": "done",
                         "summary": {"asymmetry_ratio": v, "dora_slope": v},
                         "history": [{"step_s": t} for t in (steps or {}).get(method, [])]})
    return {"runs": runs}


def test_asymmetry_and_slope_rules_on_fixed_numbers():
    claim = claims.get_claim("bora-asymmetry")
    res = _results({"dora": [4.0, 4.2, 3.9], "lora": [0.95, 1.0, 1.05], "bora": [1.0, 3.0, 0.2]})
    rows, _ = training._asymmetry(claim, res)
    start = {r["label"].split(":")[0]: r["verdict"] for r in rows if "from the start" in r["label"]}
    assert start == {"dora": "reproduced", "lora": "reproduced", "bora": "not reproduced at this scale"}
    slopes = claims.get_claim("dora-slopes")
    res = _results({"full": [-2.0, -1.5, -1.8], "lora": [-1.0, -1.2, -0.9], "dora": [-3.0, 2.0, 0.5]})
    got = {r["label"].split(":")[0]: r["verdict"] for r in training._slopes(slopes, res)[0]}
    assert got == {"full": "reproduced", "lora": "opposite", "dora": "not reproduced at this scale"}


def test_step_time_ratio_per_seed():
    claim = claims.get_claim("bora-step-time")
    t = [9.0, 9.0, 1.0, 1.0, 1.0]  # the first two steps are left out
    res = _results({"lora": [0, 0, 0], "dora": [0, 0, 0], "bora": [0, 0, 0]},
                   {"lora": t, "dora": [x * 1.27 for x in t], "bora": [x * 0.5 for x in t]})
    rows = {r["label"].split(" ")[0]: r for r in training._step_time(claim, res)[0]}
    assert rows["dora"]["ours"]["mean"] == pytest.approx(1.27) and rows["dora"]["verdict"] == "reproduced"
    assert rows["bora"]["verdict"] == "opposite"  # faster than LoRA


def test_training_claim_end_to_end_on_a_tiny_budget(tmp_path):
    rec = claims.reproduce("bora-dora-row", seeds=[0, 1], overrides=TINY, out_dir=tmp_path)
    assert rec["verdict"] in claims.VERDICTS and rec["seeds"] == [0, 1]
    assert "2 layers" in rec["budget"] and "10 runs" in rec["budget"] and "Changed from the catalogue" in rec["explanation"]
    diff = rec["rows"][0]
    assert diff["unit"] == "accuracy points" and diff["ours"]["n"] == 2
    assert (tmp_path / "results.json").is_file()  # the run folder is kept where asked
    saved = claims.save_record(rec, tmp_path / "records")
    assert json.loads(saved.read_text())["claim"] == "bora-dora-row"


def test_claims_with_the_same_settings_train_once(claims_cache, monkeypatch):
    from bora_lab.engine import trainer

    first = claims.reproduce("bora-asymmetry", seeds=[0, 1], overrides=TINY)
    assert [p.name for p in claims_cache.iterdir()] and len(list(claims_cache.iterdir())) == 1
    monkeypatch.setattr(trainer, "run", lambda *a, **k: pytest.fail("the shared comparison was trained again"))
    slopes = claims.reproduce("dora-slopes", seeds=[0, 1], overrides=TINY)  # same settings: read from the cache
    assert slopes["budget"] == first["budget"] and len(slopes["rows"]) == 3


def test_a_cancelled_claim_records_nothing():
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(claims.ClaimError, match="did not finish"):
        claims.reproduce("bora-dora-row", seeds=[0], overrides=TINY, cancel=cancel)
    with pytest.raises(claims.ClaimError, match="counted exactly"):
        claims.reproduce("qlora-memory", seeds=[1])
    with pytest.raises(claims.ClaimError, match="unknown claim"):
        claims.reproduce("nope")


def test_records_in_the_repo_are_current():
    """Each recorded result was made from the catalogue entry as it is now (else the view flags it)."""
    for c in claims.catalogue():
        rec = claims.record_of(c["id"])
        if rec is not None:
            assert not rec["stale"], f"{c['id']}: re-record with `bora-lab reproduce {c['id']} --save`"
            assert rec["verdict"] in claims.VERDICTS and rec["rows"]


def test_cli_reproduce(capsys):
    from bora_lab import cli

    assert cli.main(["reproduce", "--list"]) == 0
    assert "bora-param-percent" in capsys.readouterr().out
    assert cli.main(["reproduce", "lora2-sensitivity", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["claim"] == "lora2-sensitivity"
    assert cli.main(["reproduce", "nope"]) == cli.EXIT_BAD_INPUT
    assert "unknown claim" in capsys.readouterr().err
    assert cli.main(["reproduce", "bora-asymmetry", "--set", "warp=9"]) == cli.EXIT_BAD_INPUT
    assert "not a comparison setting" in capsys.readouterr().err


def test_set_takes_lists_as_the_compare_command_does():
    """``--set methods=full,lora,dora`` is a list of three methods, not a string of letters."""
    from bora_lab.cli_claims import parse_sets
    from bora_lab.config import RunConfig, SettingError
    from bora_lab.teach.claims.training import claim_config

    sets = parse_sets(["methods=full,lora,dora", "ranks=4,8", "steps=450", "seeds=[0, 1]", "task=fine_foods"])
    assert sets == {"methods": ["full", "lora", "dora"], "ranks": [4, 8], "steps": 450, "seeds": [0, 1],
                    "task": "fine_foods"}
    cfg = claim_config(claims.get_claim("dora-slopes"), None, parse_sets(["methods=full,lora,dora"]))
    assert cfg.methods == ["full", "lora", "dora"]
    with pytest.raises(SettingError, match="list of method names"):
        RunConfig(methods="lora")


def test_app_view_renders_and_runs_a_counting_claim():
    from bora_lab.ui import tab_claims

    assert len(tab_claims.overview()) == len(claims.catalogue())
    text, rows, fig = tab_claims.render("bora-asymmetry")
    assert "BoRA" in text and fig is not None
    out = list(tab_claims.run_claim("lora2-params", ""))
    status, text, rows, fig = out[-1]
    assert "Measured" in status and "partly reproduced" in text and len(rows) == 4
    bad = list(tab_claims.run_claim("bora-asymmetry", "0-9"))[-1]
    assert "At most 5 seeds" in bad[0]
