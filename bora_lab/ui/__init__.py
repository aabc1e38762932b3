"""The Gradio app, one module per tab over shared helpers (tabs never import each other):

* ``app.py``: ``build_demo()`` assembles the tabs into one ``gr.Blocks``; ``launch()``;
* ``tab_compare.py``: the settings form, Run/Stop and the live plots of a comparison;
* ``tab_history.py``, ``tab_lessons.py``, ``tab_inside.py``, ``tab_cards.py``, ``tab_memory.py``: the other tabs;
* ``form.py``: widgets <-> ``RunConfig`` and method options (labels and bounds from ``RunConfig``'s metadata);
* ``session.py``: a visitor's state (``gr.State``): the running ``Job`` and their saved runs;
* ``common.py``: results -> plots and table, progress bar, error text.
"""
