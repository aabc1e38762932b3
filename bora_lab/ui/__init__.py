"""The Gradio app, split from the engine (LLaMA-Factory ``webui/``):

* ``layout.py``: ``build_demo()`` builds the ``gr.Blocks`` (components and wiring only);
* ``handlers.py``: widgets <-> ``RunConfig`` and trainer events -> figure/table updates;
* ``live.py``: one comparison running in a background thread, per browser session;
* ``history.py``: the History tab (saved runs on disk, overlay, downloads).

Nothing here imports torch or holds a model in a module global.
"""
