"""Rebuild the offline datasets shipped in ``bora_lab/data/`` from Debian packages.

The app and the tests must work without the Hugging Face hub, so BoRA Lab ships two small
real-text datasets as zstd parquet files. Both come from Debian packages of CRAN data packages,
which are reachable from machines that only see the Debian mirrors:

* ``r-cran-modeldata``  -> ``small_fine_foods`` (Amazon fine-food reviews, SNAP), written as
  ``fine_foods_train.parquet`` / ``fine_foods_test.parquet``;
* ``r-cran-janeaustenr`` -> the six Jane Austen novels (Project Gutenberg), one line per row,
  written as ``austen.parquet``.

The packages are only downloaded and unpacked (``apt-get download`` + ``dpkg -x``), never
installed, because installing them pulls in all of R. Their data live in R lazy-load databases
(``data/Rdata.rdx`` index + ``data/Rdata.rdb`` blob), decoded here with the PyPI package ``rdata``.

Usage (from the repository root)::

    python scripts/build_offline_data.py            # writes bora_lab/data/*.parquet + PROVENANCE.md
    python scripts/build_offline_data.py --work-dir /tmp/debs   # keep the downloaded .deb files
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import lzma
import os
import struct
import subprocess
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import rdata

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "bora_lab" / "data"
SITE_LIBRARY = Path("usr/lib/R/site-library")
PACKAGES = ("r-cran-modeldata", "r-cran-janeaustenr")
ZSTD_LEVEL = 19

# R object name -> book title, in the order of janeaustenr::austen_books().
AUSTEN_OBJECTS = (
    ("sensesensibility", "Sense & Sensibility"),
    ("prideprejudice", "Pride & Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
)
# Project Gutenberg ebook numbers, as cited in the janeaustenr help pages.
GUTENBERG_IDS = {
    "Sense & Sensibility": 161,
    "Pride & Prejudice": 1342,
    "Mansfield Park": 141,
    "Emma": 158,
    "Northanger Abbey": 121,
    "Persuasion": 105,
}
# Counts documented for modeldata::small_fine_foods; the build fails loudly if they change.
EXPECTED_FINE_FOODS = {
    "train": {"great": 2600, "other": 1400},
    "test": {"great": 658, "other": 342},
}


@dataclass
class DebInfo:
    """One downloaded Debian package."""

    name: str  # e.g. "r-cran-modeldata"
    version: str  # Debian version, e.g. "1.1.0-1"
    filename: str  # the .deb file name
    sha256: str  # checksum of the .deb


# ----------------------------------------------------------------------------- download / unpack


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_debs(work_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """``apt-get download`` the packages into ``work_dir`` (runs ``apt-get update`` if needed).

    Args:
        work_dir: Folder that receives the ``.deb`` files.

    Returns:
        Package name -> path of its ``.deb``, and apt's ``Get:`` lines (mirror, suite, version).
    """
    cmd = ["apt-get", "download", *PACKAGES]
    result = subprocess.run(cmd, cwd=work_dir, capture_output=True, text=True)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update"], check=True, capture_output=True)
        result = subprocess.run(cmd, cwd=work_dir, check=True, capture_output=True, text=True)
    fetched = [line for line in result.stdout.splitlines() if line.startswith("Get:")]
    debs = {}
    for name in PACKAGES:
        found = sorted(work_dir.glob(f"{name}_*.deb"))
        if len(found) != 1:
            raise RuntimeError(f"expected one {name} .deb in {work_dir}, found {found}")
        debs[name] = found[0]
    return debs, fetched


def deb_info(name: str, deb: Path) -> DebInfo:
    """Read the version of a ``.deb`` with ``dpkg-deb`` and checksum it."""
    version = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True
    ).stdout.strip()
    return DebInfo(name=name, version=version, filename=deb.name, sha256=_sha256(deb))


def unpack(deb: Path, dest: Path) -> None:
    """Unpack a ``.deb`` without installing it (``dpkg -x``)."""
    subprocess.run(["dpkg", "-x", str(deb), str(dest)], check=True)


# ----------------------------------------------------------------------------- R lazy-load DB


def decompress_chunk(blob: bytes, compressed: int) -> bytes:
    """Decode one object of an R lazy-load ``.rdb`` file.

    Each chunk is a 4-byte big-endian uncompressed length, then either a zlib stream
    (``compressed == 1``), or (``compressed`` 2 or 3) a type byte followed by the payload:
    ``Z`` raw LZMA2 stream (xz preset 9 extreme), ``2`` bzip2, ``1`` zlib, ``0`` stored.
    This mirrors ``R_decompress1``/``R_decompress3`` in R's ``src/main/serialize.c``.

    Args:
        blob: The chunk bytes (``length`` bytes read at ``offset``).
        compressed: The ``compressed`` entry of the ``.rdx`` index.

    Returns:
        The serialized R object (starts with ``X\\n`` for XDR format).
    """
    (size,) = struct.unpack(">I", blob[:4])
    if compressed in (2, 3):
        kind, body = blob[4:5], blob[5:]
        if kind == b"Z":
            filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
            out = lzma.decompress(body, format=lzma.FORMAT_RAW, filters=filters)
        elif kind == b"2":
            out = bz2.decompress(body)
        elif kind == b"1":
            out = zlib.decompress(body)
        elif kind == b"0":
            out = body
        else:
            raise ValueError(f"unknown lazy-load chunk type {kind!r}")
    else:
        out = zlib.decompress(blob[4:])
    if len(out) != size:
        raise ValueError(f"chunk decompressed to {len(out)} bytes, header says {size}")
    return out


def read_lazy_objects(data_dir: Path, names: list[str]) -> dict[str, object]:
    """Read named objects from ``data_dir/Rdata.rdx`` + ``Rdata.rdb``.

    Args:
        data_dir: The package's ``data/`` folder.
        names: R object names to read.

    Returns:
        Name -> object converted by ``rdata`` (data.frame -> ``pd.DataFrame``,
        character vector -> ``np.ndarray``).
    """
    with warnings.catch_warnings():
        # Expected and harmless: the .rdx / chunks have no RDS file-name extension, and tibbles
        # ("tbl_df") fall back to rdata's data.frame constructor.
        for message in ("Unknown file type", "Wrong extension", "Missing constructor for R class"):
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        index = rdata.conversion.convert(rdata.parser.parse_file(data_dir / "Rdata.rdx"))
        compressed = int(index["compressed"][0])
        objects = {}
        with open(data_dir / "Rdata.rdb", "rb") as rdb:
            for name in names:
                offset, length = (int(v) for v in index["variables"][name])
                rdb.seek(offset)
                raw = decompress_chunk(rdb.read(length), compressed)
                parsed = rdata.parser.parse_data(raw, expand_altrep=True)
                objects[name] = rdata.conversion.convert(parsed)
    return objects


# ----------------------------------------------------------------------------- tables


def fine_foods_frames(site: Path) -> dict[str, pd.DataFrame]:
    """``small_fine_foods`` as ``{"train", "test"}`` frames with text/label/label_name/product."""
    objects = read_lazy_objects(site / "modeldata" / "data", ["training_data", "testing_data"])
    frames = {}
    for split, name in (("train", "training_data"), ("test", "testing_data")):
        raw = objects[name]
        label_name = raw["score"].astype(str).to_numpy()
        frame = pd.DataFrame(
            {
                "text": raw["review"].astype(str).to_numpy(),
                "label": (label_name == "great").astype("int8"),  # 1 = 5 stars, 0 = 1-4 stars
                "label_name": label_name,
                "product": raw["product"].astype(str).to_numpy(),
            }
        )
        counts = frame["label_name"].value_counts().to_dict()
        if counts != EXPECTED_FINE_FOODS[split]:
            raise ValueError(f"fine foods {split}: label counts {counts}")
        frames[split] = frame
    return frames


def austen_frame(site: Path) -> pd.DataFrame:
    """The six novels, one line per row (blank lines kept: they separate paragraphs)."""
    objects = read_lazy_objects(site / "janeaustenr" / "data", [n for n, _ in AUSTEN_OBJECTS])
    parts = [
        pd.DataFrame({"text": objects[name].astype(str), "book": title})
        for name, title in AUSTEN_OBJECTS
    ]
    return pd.concat(parts, ignore_index=True)


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    """Write a compact, metadata-free zstd parquet file (atomically: temp file, then rename)."""
    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    partial = path.with_name(path.name + ".partial")
    pq.write_table(
        table,
        partial,
        compression="zstd",
        compression_level=ZSTD_LEVEL,
        write_statistics=False,
        use_dictionary=["book", "label_name", "product"],  # low-cardinality columns only
    )
    os.replace(partial, path)  # a reader never sees a half-written file


# ----------------------------------------------------------------------------- provenance


def provenance_markdown(
    debs: dict[str, DebInfo],
    fetched: list[str],
    files: dict[str, tuple[int, Path]],
    fine_foods: dict[str, pd.DataFrame],
) -> str:
    """Render ``PROVENANCE.md``: sources, licences, rebuild command, rows and checksums."""
    products = {split: set(frame["product"]) for split, frame in fine_foods.items()}
    n_products = {split: len(p) for split, p in products.items()}
    n_products["shared"] = len(products["train"] & products["test"])
    all_text = pd.concat([frame["text"] for frame in fine_foods.values()])
    br_share = all_text.str.contains("<br", regex=False).mean()
    modeldata, austen = debs["r-cran-modeldata"], debs["r-cran-janeaustenr"]
    books = ",\n".join(
        f"  *{title}* (<https://www.gutenberg.org/ebooks/{num}>)"
        for title, num in GUTENBERG_IDS.items()
    )
    rows = "\n".join(
        f"| `{name}` | {n_rows:,} | {path.stat().st_size:,} | `{_sha256(path)}` |"
        for name, (n_rows, path) in files.items()
    )
    deb_rows = "\n".join(
        f"| `{d.name}` | `{d.version}` | `{d.filename}` | `{d.sha256}` |" for d in debs.values()
    )
    return f"""# Provenance of the offline datasets

Built by `scripts/build_offline_data.py` (pyarrow {pa.__version__}, pandas
{pd.__version__}, rdata {rdata.__version__}). Rebuild from the repository root with

```bash
python scripts/build_offline_data.py
```

The script runs `apt-get download {" ".join(PACKAGES)}` (after
`apt-get update` if needed) and unpacks them with `dpkg -x`; they are never installed. It decodes
the R lazy-load databases `usr/lib/R/site-library/<pkg>/data/Rdata.rdx` + `Rdata.rdb` with the
PyPI package `rdata` and writes zstd (level {ZSTD_LEVEL}) parquet files. The parquet checksums
depend on the pyarrow version; the rows do not.

## Source packages (Debian)

| package | version | file | sha256 of the .deb |
| --- | --- | --- | --- |
{deb_rows}

apt reported:

```
{chr(10).join(fetched)}
```

## Amazon fine foods: `fine_foods_train.parquet`, `fine_foods_test.parquet`

- From `{modeldata.name}` {modeldata.version} (CRAN `modeldata`, Max Kuhn and Posit Software,
  PBC; MIT licence), objects `training_data` / `testing_data` of `small_fine_foods`.
- Origin: the SNAP "Amazon Fine Foods" reviews
  (<https://snap.stanford.edu/data/web-FineFoods.html>; J. McAuley and J. Leskovec, "From
  amateurs to connoisseurs: modeling the evolution of user expertise through online reviews",
  WWW 2013), also published on Kaggle under CC0.
- Products: {n_products["train"]:,} distinct in train, {n_products["test"]:,} in test,
  {n_products["shared"]} shared. (modeldata's help page describes "10 products" with all
  their reviews for training and "500" for test; the shipped objects do not match that.)
- Columns: `text` (the review, unchanged; {br_share:.0%} of reviews contain HTML `<br />`
  tags), `label` (int8: 1 = `great`, the reviewer gave 5 stars; 0 = `other`, 1 to 4 stars),
  `label_name` (`great`/`other`), `product` (Amazon ASIN).

## Jane Austen: `austen.parquet`

- From `{austen.name}` {austen.version} (CRAN `janeaustenr`, Julia Silge; MIT licence).
- Origin: Project Gutenberg plain-text editions, public domain:
{books}.
- Columns: `text` (one line of about 70 characters; blank lines kept, they separate
  paragraphs), `book` (title, in the order of `janeaustenr::austen_books()`).

## Files

| file | rows | bytes | sha256 |
| --- | --- | --- | --- |
{rows}
"""


# ----------------------------------------------------------------------------- main


def build(out_dir: Path, work_dir: Path) -> dict[str, tuple[int, Path]]:
    """Download, decode and write every dataset plus ``PROVENANCE.md``.

    Args:
        out_dir: Destination folder (``bora_lab/data``).
        work_dir: Scratch folder for the ``.deb`` files and their unpacked trees.

    Returns:
        File name -> (row count, path) for every parquet file written.
    """
    debs, fetched = download_debs(work_dir)
    infos = {name: deb_info(name, deb) for name, deb in debs.items()}
    root = work_dir / "unpacked"
    for deb in debs.values():
        unpack(deb, root)
    site = root / SITE_LIBRARY

    fine_foods = fine_foods_frames(site)
    tables = {f"fine_foods_{split}.parquet": df for split, df in fine_foods.items()}
    tables["austen.parquet"] = austen_frame(site)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, frame in tables.items():
        write_parquet(frame, out_dir / name)
        files[name] = (len(frame), out_dir / name)
    provenance = provenance_markdown(infos, fetched, files, fine_foods)
    partial = out_dir / "PROVENANCE.md.partial"
    partial.write_text(provenance, encoding="utf-8")
    os.replace(partial, out_dir / "PROVENANCE.md")
    return files


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="where to write")
    parser.add_argument("--work-dir", type=Path, help="keep downloads here (default: temp dir)")
    args = parser.parse_args(argv)
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        files = build(args.out_dir, args.work_dir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="bora_data_") as tmp:
            files = build(args.out_dir, Path(tmp))
    for name, (n_rows, path) in files.items():
        print(f"{name}: {n_rows:,} rows, {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
