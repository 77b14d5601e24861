"""Data recipes: which MIDI files each data set contributes to train and dev, and their licences.

The dev split is POP909's dev folder plus Groove's official validation split; it never enters
training. POP909's held-out test songs and Groove's test split are not in the data folder.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

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


RECIPES = {"pop909": pop909, "groove": groove}


def sources(data_root: Path, names=tuple(RECIPES)) -> list[Source]:
    found = []
    for name in names:
        source = RECIPES[name](data_root)
        if not source.train and not source.dev:
            raise FileNotFoundError(f"no {name} files under {data_root}")
        found.append(source)
    return found
