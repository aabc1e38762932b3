"""The Gradio app, one module per tab over shared helpers (tabs never import each other):

* ``app.py``: ``build_demo()`` assembles the tabs into one ``gr.Blocks``; ``launch()``;
* ``tab_compare.py``: Run/Stop and the live plots of a comparison; ``compare_layout.py``: its widgets;
* ``tab_history.py``, ``tab_lessons.py``, ``tab_inside.py``, ``tab_cards.py``, ``tab_memory.py``: the other tabs;
* ``form.py``: widgets <-> ``RunConfig`` and method options (labels and bounds from ``RunConfig``'s metadata);
* ``visitor.py``: a visitor's state (``gr.State``): the running ``Job`` and their saved runs;
* ``training_queue.py`` (one training at a time, positions), ``reuse.py`` (identical settings computed
  once), ``links.py`` (settings in the address, presenter mode), ``space.py`` (Hugging Face Spaces:
  the runs folder, ZeroGPU): a whole class on one server;
* ``common.py``: results -> plots and table, progress bar, error text;
* ``i18n.py``: the page in English, 简体中文 and 繁體中文 (Gradio's ``gr.I18n``, tables in ``locales/``).
"""
