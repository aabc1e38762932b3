"""The torch-free record of a comparison: events, the one accumulator, summaries, the results table,
layer checkpoints, the ``results.json`` schema and its files. Imports nothing heavy, so the app and
the figures can use it freely.

    from bora_lab.record import ResultsAccumulator, save_results, load_results
    acc = ResultsAccumulator(cfg)
    for event in bora_lab.engine.compare(cfg):
        acc.update(event)
    save_results(acc.results, "runs/demo", layers=acc.layers)
"""
from .accumulator import SCHEMA_VERSION, STATUSES, ResultsAccumulator, fold, new_run_entry, summarize
from .files import list_results, load_results, save_results
from .layer_store import LayerStore
from .tables import results_table

__all__ = ["SCHEMA_VERSION", "STATUSES", "LayerStore", "ResultsAccumulator", "fold", "list_results", "load_results",
           "new_run_entry", "results_table", "save_results", "summarize"]
