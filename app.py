"""BoRA Lab: `python app.py` opens the app on the offline default (MiniLM + fine-food reviews)."""
from bora_lab.ui.app import build_demo, launch

demo = build_demo()

if __name__ == "__main__":
    launch(demo)
