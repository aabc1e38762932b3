"""Teaching views' logic: method cards, the memory calculator and lessons (no Gradio here).

Each module imports torch/transformers only inside the functions that need them, so
``from bora_lab.teach import lessons`` stays cheap for the UI.
"""
