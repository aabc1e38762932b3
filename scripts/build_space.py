"""Assemble the files of BoRA Lab's Hugging Face Space into one folder, ready to push.

    python scripts/build_space.py OUT          # OUT must be empty or absent
    python scripts/build_space.py OUT --force  # replace OUT

The folder holds what the Space runs and nothing else: ``app.py``, the ``bora_lab`` package (with its
data: the fine-food reviews, Austen, step times, lessons, claim records; no ``__pycache__``),
``requirements.txt`` (the app lock, no test tools) and ``README.md``, whose front matter configures
the Space (``sdk: gradio``, ``sdk_version`` = the gradio pin of the lock, ``python_version``,
``app_file``). A ``.gitattributes`` sends the binary data through Git LFS, which the Hub asks for.
Tests, benchmarks, docs, examples and scripts stay behind. Then, for example:

    huggingface-cli upload <user>/bora-lab OUT . --repo-type space

The Space runs ``python app.py`` with ``SPACE_ID`` set: BoRA Lab's tighter limits and private runs
apply (``bora_lab.limits``), and runs are kept in ``/data`` when the Space has persistent storage.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ("app.py", "requirements.txt", "README.md")
PACKAGE = "bora_lab"
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".DS_Store")
LFS = ("*.parquet", "*.safetensors", "*.gguf", "*.bin", "*.png")


def front_matter(readme: str) -> dict[str, str]:
    """The ``key: value`` lines between the README's leading ``---`` lines (quotes removed)."""
    match = re.match(r"---\n(.*?)\n---\n", readme, re.S)
    if not match:
        return {}
    pairs = (line.split(":", 1) for line in match.group(1).splitlines() if ":" in line)
    return {k.strip(): v.strip().strip("'\"") for k, v in pairs}


def pinned(requirements: str, name: str) -> str | None:
    """The version ``name`` is pinned to in a requirements file, or None."""
    match = re.search(rf"^{re.escape(name)}==([^\s;#]+)", requirements, re.M | re.I)
    return match.group(1) if match else None


def check(root: Path = ROOT) -> list[str]:
    """What is wrong with the Space's configuration (empty when nothing is)."""
    meta = front_matter((root / "README.md").read_text(encoding="utf-8"))
    lock = (root / "requirements.txt").read_text(encoding="utf-8")
    problems = []
    for key, want in (("sdk", "gradio"), ("app_file", "app.py"), ("sdk_version", pinned(lock, "gradio"))):
        if meta.get(key) != want:
            problems.append(f"README front matter: {key} is {meta.get(key)!r}, expected {want!r}")
    if not re.fullmatch(r"3\.\d+", meta.get("python_version", "")):
        problems.append("README front matter: python_version must be like 3.11")
    tools = [t for t in ("pytest", "playwright", "nbclient") if pinned(lock, t)]
    if tools:
        problems.append(f"requirements.txt holds test tools: {', '.join(tools)}")
    return problems


def build(out: Path, force: bool = False, root: Path = ROOT) -> Path:
    """Copy the Space's files from ``root`` into ``out`` and return ``out``.

    Raises:
        ValueError: the front matter or the lock is wrong (see :func:`check`), or ``out`` is not empty.
    """
    problems = check(root)
    if problems:
        raise ValueError("; ".join(problems))
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ValueError(f"{out} is not empty (use --force to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copy2(root / name, out / name)
    shutil.copytree(root / PACKAGE, out / PACKAGE, ignore=SKIP)
    (out / ".gitattributes").write_text("".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="the folder to write (empty or absent)")
    p.add_argument("--force", action="store_true", help="replace the folder if it has files")
    args = p.parse_args(argv)
    try:
        out = build(args.out, args.force)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"Space assembled in {out} ({size / 1e6:.1f} MB): {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
