"""Tokenize the data recipes into flat token shards: uint16 tokens plus document offsets.

    python -m training.prepare --data ../shared/data --out runs/shards [--augment 2] [--workers 2]

Per split, `<split>.tokens.u16` holds every document's token ids back to back (read it with
numpy.memmap, dtype uint16) and `<split>.offsets.npy` the int64 start of each document plus the
end; `manifest.json` records counts, sources, licences, augmentation and drops. Training reads
nothing but integers. The dev split is never augmented and never used for training.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cmi_daemon import vocab
from cmi_daemon.errors import CMIError
from cmi_daemon.tokens import read_midi, tokenize
from training.augment import TEMPO_FACTORS, TRANSPOSE_SEMITONES, VELOCITY_FACTORS, Augmentation, augment
from training.recipes import DEV, RECIPES, TRAIN, sources

TOKEN_DTYPE = np.uint16
MIN_DOCUMENT_TOKENS = 16


def tokenize_item(item):
    """(path, augmentation or None) -> (path, token array or None, drops, error message or None)."""
    path, augmentation = item
    try:
        song = read_midi(path)
        if augmentation is not None:
            song = augment(song, augmentation)
        encoding = tokenize(song)
    except (CMIError, ValueError) as error:
        return path, None, Counter(), str(error)
    return path, np.asarray(encoding.ids, dtype=TOKEN_DTYPE), encoding.drops, None


def work_items(paths, n_augmented: int, seed: int):
    """Each file as it is, then n_augmented copies drawn from a generator seeded by its name."""
    for path in paths:
        yield str(path), None
        rng = random.Random(f"{seed}:{Path(path).name}")
        for _ in range(n_augmented):
            yield str(path), Augmentation.draw(rng)


def write_split(out_dir: Path, split: str, items: list, workers: int) -> dict:
    tokens_path = out_dir / f"{split}.tokens.u16"
    offsets = [0]
    drops, failures, per_file = Counter(), [], Counter()
    with open(tokens_path, "wb") as tokens_file, multiprocessing.Pool(workers) as pool:
        for path, ids, item_drops, error in tqdm(pool.imap(tokenize_item, items, chunksize=4),
                                                 total=len(items), desc=f"tokenizing {split}", unit="file"):
            if error is not None:
                failures.append(error)
                continue
            drops += item_drops
            if len(ids) < MIN_DOCUMENT_TOKENS:
                drops["documents shorter than 16 tokens"] += 1
                continue
            tokens_file.write(ids.tobytes())
            offsets.append(offsets[-1] + len(ids))
            per_file[path] += 1
    np.save(out_dir / f"{split}.offsets.npy", np.asarray(offsets, dtype=np.int64))
    return {"documents": len(offsets) - 1, "tokens": offsets[-1], "files": len(per_file),
            "drops": dict(drops), "unreadable_files": failures}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def prepare(data_root: Path, out_dir: Path, names, n_augmented: int, workers: int, seed: int) -> dict:
    found = sources(data_root, names)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.time()
    train_items = [i for s in found for i in work_items(s.train, n_augmented, seed)]
    dev_items = [i for s in found for i in work_items(s.dev, 0, seed)]
    manifest = {
        "vocab_id": vocab.VOCAB_ID,
        "token_dtype": "uint16",
        "data_root": str(data_root),
        "git_commit": git_commit(),
        "seed": seed,
        "augmented_copies_per_train_file": n_augmented,
        "augmentation_choices": {"transpose_semitones": TRANSPOSE_SEMITONES, "tempo_factors": TEMPO_FACTORS,
                                 "velocity_factors": VELOCITY_FACTORS},
        "sources": [{"name": s.name, "licence": s.licence, "credit": s.credit,
                     "train_files": len(s.train), "dev_files": len(s.dev)} for s in found],
        "splits": {TRAIN: write_split(staging, TRAIN, train_items, workers),
                   DEV: write_split(staging, DEV, dev_items, workers)},
    }
    manifest["seconds"] = round(time.time() - started, 1)
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return manifest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("runs/shards"))
    parser.add_argument("--sources", default=",".join(RECIPES), help="comma-separated: " + ", ".join(RECIPES))
    parser.add_argument("--augment", type=int, default=2, help="augmented copies of each train file")
    parser.add_argument("--workers", type=int, default=max(1, multiprocessing.cpu_count()))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    manifest = prepare(args.data, args.out, args.sources.split(","), args.augment, args.workers, args.seed)
    for split, summary in manifest["splits"].items():
        print(f"{split}: {summary['documents']} documents, {summary['tokens']} tokens, "
              f"{len(summary['unreadable_files'])} unreadable files")
    print(f"wrote {args.out} in {manifest['seconds']} s")


if __name__ == "__main__":
    main()
