"""``python -m bora_lab compare ...``: see ``bora_lab/cli.py``."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
