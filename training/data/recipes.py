"""Data recipes: which MIDI files each data set contributes to train and dev, and their licences.

The dev split is POP909's dev folder plus Groove's official validation split; it never enters
training. POP909's held-out test songs and Groove's test split are not in the data folder.
Two more recipes:
- `music21`: the Bach chorales of the music21 corpus (public domain), written once as MIDI into a
  cache folder (resumable; `pip install music21`). The corpus's Essen folk songs are licensed for
  non-commercial use only and are never used.
- `folder`: any folder of MIDI files (Lakh MIDI, a private collection: the paper's scale), with the
  licence and credit the user gives; a file's split is drawn from its content hash, so it never
  changes between runs or machines.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("cmi.training")

TRAIN = "train"
DEV = "dev"


@dataclass(frozen=True)
class Source:
    name: str
    licence: str
    credit: str
    train: tuple[Path, ...]
    dev: tuple[Path, ...]


def pop909(data_root: Path) -> Source:
    """POP909 train songs with their alternative arrangements (versions/); dev songs alone."""
    root = Path(data_root) / "pop909"
    train = sorted(root.glob("train/*/*.mid")) + sorted(root.glob("train/*/versions/*.mid"))
    dev = sorted(root.glob("dev/*/*.mid"))
    return Source("pop909", "MIT", "POP909, Music X Lab 2020 (Wang et al., ISMIR 2020)", tuple(train), tuple(dev))


def groove(data_root: Path) -> Source:
    """Groove MIDI Dataset by its official split: train -> train, validation -> dev."""
    root = Path(data_root) / "groove"
    splits: dict[str, list[Path]] = {TRAIN: [], DEV: []}
    with open(root / "info.csv", newline="") as file:
        for row in csv.DictReader(file):
            split = {"train": TRAIN, "validation": DEV}.get(row["split"])
            path = root / row["midi_filename"]
            if split and path.exists():
                splits[split].append(path)
    return Source("groove", "CC BY 4.0", "Groove MIDI Dataset (Gillick et al., ICML 2019)",
                  tuple(sorted(splits[TRAIN])), tuple(sorted(splits[DEV])))


MIDI_SUFFIXES = (".mid", ".midi")
FOLDER_DEV_SHARE_PERCENT = 2
"""Share of a folder's files (by content hash) that form its dev split."""


def content_hash(path: Path) -> str:
    """sha256 of a file's bytes: the identity prepare deduplicates by and splits a folder by."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def folder(root: Path, licence: str, credit: str) -> Source:
    """Every MIDI file under root (recursively); a file is dev when its content hash says so."""
    root = Path(root)
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES and p.is_file())
    dev = {p for p in paths if int(content_hash(p)[:8], 16) % 100 < FOLDER_DEV_SHARE_PERCENT}
    return Source(f"folder {root.name}", licence, credit, tuple(p for p in paths if p not in dev),
                  tuple(p for p in paths if p in dev))


MUSIC21_LICENCE = "public domain (compositions); music21 corpus encodings, BSD-3-Clause"
MUSIC21_CREDIT = "J. S. Bach chorales from the music21 corpus (Cuthbert and Ariza, ISMIR 2010)"
MUSIC21_DEV_EVERY = 20
"""Every 20th chorale (in the corpus's order) is dev."""


def music21_bach(cache_dir: Path) -> Source:
    """The music21 corpus's Bach chorales as MIDI files in cache_dir (converted once; files already
    there are kept, so an interrupted conversion resumes). Each part is a track named by its voice."""
    try:
        from music21 import corpus
    except ImportError as error:
        raise RecipeError("the music21 recipe needs the music21 package: pip install music21") from error
    cache_dir = Path(cache_dir) / "music21-bach"
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for source in sorted(corpus.getComposer("bach"), key=str):
        target = cache_dir / (Path(source).name.split(".mxl")[0].replace(".", "_") + ".mid")
        if not target.exists():
            try:
                score = corpus.parse(source)
                staging = target.with_suffix(".mid.partial")
                score.write("midi", fp=str(staging))
                staging.replace(target)
            except Exception as error:  # music21 raises many kinds of errors on odd scores
                log.warning("music21: %s not converted (%s: %s)", source, type(error).__name__, error)
                continue
        paths.append(target)
    dev = set(paths[::MUSIC21_DEV_EVERY])
    return Source("music21", MUSIC21_LICENCE, MUSIC21_CREDIT, tuple(p for p in paths if p not in dev),
                  tuple(p for p in paths if p in dev))


class RecipeError(Exception):
    """A recipe cannot run here; the message says why and what to install or pass."""


RECIPES = {"pop909": pop909, "groove": groove, "music21": music21_bach}
"""Named recipes; pop909 and groove read the data folder, music21 writes into the cache folder."""


def sources(data_root: Path, names=("pop909", "groove"), cache_dir: Path | None = None) -> list[Source]:
    found = []
    for name in names:
        if name not in RECIPES:
            raise RecipeError(f"no recipe {name!r}; choose from {', '.join(RECIPES)}")
        if name == "music21":
            source = music21_bach(cache_dir or Path(data_root))
        else:
            source = RECIPES[name](data_root)
        if not source.train and not source.dev:
            raise FileNotFoundError(f"no {name} files under {data_root}")
        found.append(source)
    return found
