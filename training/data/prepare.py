"""Tokenize the data recipes into flat token shards: uint16 tokens plus document offsets.

    python -m training.prepare --data ../shared/data --out runs/shards [--steps-per-qn 24] [--augment 2]
        [--sources pop909,groove,music21] [--folder DIR --folder-licence L --folder-credit C]
        [--workers N] [--resume]

Per split, `<split>.tokens.u16` holds every document's token ids back to back (read it with
numpy.memmap, dtype uint16) and `<split>.offsets.npy` the int64 start of each document plus the
end; `manifest.json` records the tokenizer (time unit, role bins), counts, sources and licences,
augmentation, drops, duplicates and unreadable files by cause. Training reads nothing but integers.

Every file is read once per copy, in parallel, in parts of a few dozen files written as they
finish: `--resume` continues an interrupted run from its last whole part (`OUT.partial/`). Files
are deduplicated by content hash; a train file with the content of a dev file is left out. The dev
split is never augmented and never used for training.
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

from cmi_daemon.errors import CMIError
from cmi_daemon.files import write_bytes_atomic
from cmi_daemon.music import vocab
from cmi_daemon.music.timeunit import TimeUnit
from cmi_daemon.music.tokens import read_midi, tokenize
from training.data.augment import TEMPO_FACTORS, TRANSPOSE_SEMITONES, VELOCITY_BIN_SHIFTS, Augmentation, augment
from training.data.failures import Failures
from training.data.recipes import DEV, RECIPES, TRAIN, Source, content_hash, folder, sources

TOKEN_DTYPE = np.uint16
MIN_DOCUMENT_TOKENS = 16
PART_FILES_PER_WORKER = 16
"""A part (the unit --resume keeps) holds this many work items per worker."""


def tokenize_item(item):
    """(path, augmentation or None, steps per QN) -> (path, token array or None, drops, (error type,
    message) or None)."""
    path, augmentation, steps_per_qn = item
    try:
        song = read_midi(path)
        if augmentation is not None:
            song = augment(song, augmentation)
        encoding = tokenize(TimeUnit(steps_per_qn).token_song(song))
    except (CMIError, ValueError, OSError, EOFError, KeyError, IndexError) as error:
        return path, None, Counter(), (type(error).__name__, str(error).replace(path, "FILE"))
    return path, np.asarray(encoding.ids, dtype=TOKEN_DTYPE), encoding.drops, None


def work_items(paths, n_augmented: int, seed: int, unit: TimeUnit = TimeUnit()):
    """Each file as it is, then n_augmented copies drawn from a generator seeded by its name."""
    for path in paths:
        yield str(path), None, unit.steps_per_qn
        rng = random.Random(f"{seed}:{Path(path).name}")
        for _ in range(n_augmented):
            yield str(path), Augmentation.draw(rng, unit.tempo_relative), unit.steps_per_qn


def unique_files(found: list[Source]) -> tuple[dict[str, list[Path]], Counter]:
    """Train and dev paths of every source without repeated content: dev first, then train files
    whose content is neither in dev nor earlier in train; the counts of what was left out."""
    seen: set[str] = set()
    kept: dict[str, list[Path]] = {DEV: [], TRAIN: []}
    left_out: Counter = Counter()
    for split in (DEV, TRAIN):
        for source in found:
            for path in getattr(source, split):
                digest = content_hash(path)
                if digest in seen:
                    left_out[f"{split} file with the content of an earlier file"] += 1
                    continue
                seen.add(digest)
                kept[split].append(path)
    return kept, left_out


def write_split(out_dir: Path, split: str, items: list, workers: int) -> dict:
    """Tokenize items into out_dir's `<split>` files, part by part under out_dir/parts (parts
    already there are kept: that is how a run resumes)."""
    parts_dir = out_dir / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    part_items = PART_FILES_PER_WORKER * max(1, workers)
    parts = [items[start:start + part_items] for start in range(0, len(items), part_items)]
    with multiprocessing.Pool(workers) as pool, tqdm(total=len(items), desc=f"tokenizing {split}", unit="file") as bar:
        for index, part in enumerate(parts):
            summary_path = parts_dir / f"{split}-{index:05d}.json"
            if not summary_path.exists():
                write_part(parts_dir / f"{split}-{index:05d}", summary_path, pool.map(tokenize_item, part, chunksize=2))
            bar.update(len(part))
    return join_parts(out_dir, split, len(parts))


def write_part(stem: Path, summary_path: Path, results) -> None:
    """One part's token ids, document lengths and summary; the summary, written last, marks it whole."""
    drops, failures, files, lengths, chunks = Counter(), Failures(), set(), [], []
    for path, ids, item_drops, error in results:
        if error is not None:
            failures.add_cause("read", *error, path)
            continue
        drops += item_drops
        if len(ids) < MIN_DOCUMENT_TOKENS:
            drops[f"documents shorter than {MIN_DOCUMENT_TOKENS} tokens"] += 1
            continue
        chunks.append(ids)
        lengths.append(len(ids))
        files.add(path)
    write_bytes_atomic(stem.with_suffix(".u16"), b"".join(ids.tobytes() for ids in chunks))
    np.save(stem.with_suffix(".lengths.npy"), np.asarray(lengths, dtype=np.int64))
    summary = {"drops": dict(drops), "unreadable": failures.as_dict(), "files": sorted(files)}
    write_bytes_atomic(summary_path, json.dumps(summary).encode())


def join_parts(out_dir: Path, split: str, n_parts: int) -> dict:
    parts_dir = out_dir / "parts"
    offsets, drops, unreadable, files = [0], Counter(), Counter(), set()
    with open(out_dir / f"{split}.tokens.u16", "wb") as tokens_file:
        for index in range(n_parts):
            stem = parts_dir / f"{split}-{index:05d}"
            summary = json.loads((parts_dir / f"{split}-{index:05d}.json").read_text())
            tokens_file.write(stem.with_suffix(".u16").read_bytes())
            for length in np.load(stem.with_suffix(".lengths.npy")).tolist():
                offsets.append(offsets[-1] + length)
            drops.update(summary["drops"])
            files.update(summary["files"])
            for failure in summary["unreadable"]:
                unreadable[(failure["error"], failure["cause"])] += failure["count"]
    np.save(out_dir / f"{split}.offsets.npy", np.asarray(offsets, dtype=np.int64))
    return {"documents": len(offsets) - 1, "tokens": offsets[-1], "files": len(files), "drops": dict(drops),
            "unreadable_files": [{"error": kind, "cause": cause, "count": count}
                                 for (kind, cause), count in unreadable.most_common()]}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def prepare(data_root: Path, out_dir: Path, found: list[Source], n_augmented: int, workers: int, seed: int,
            unit: TimeUnit = TimeUnit(), resume: bool = False) -> dict:
    staging = out_dir.with_name(out_dir.name + ".partial")
    if not resume:
        shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    started = time.time()
    files, left_out = unique_files(found)
    train_items = list(work_items(files[TRAIN], n_augmented, seed, unit))
    dev_items = list(work_items(files[DEV], 0, seed, unit))
    manifest = {
        "vocab_id": vocab.VOCAB_ID,
        "token_dtype": "uint16",
        "tokenizer": {"steps_per_qn": unit.steps_per_qn, "role_bins": n_augmented > 0},
        "time_unit": unit.describe(),
        "data_root": str(data_root),
        "git_commit": git_commit(),
        "seed": seed,
        "augmented_copies_per_train_file": n_augmented,
        "augmentation_choices": {"roles": "engine's distinct_bins or random by role, bass split off",
                                 "tempo_factors": [] if unit.tempo_relative else TEMPO_FACTORS,
                                 "per_example_transpose_semitones": TRANSPOSE_SEMITONES,
                                 "per_example_velocity_bin_shifts": VELOCITY_BIN_SHIFTS},
        "sources": [{"name": s.name, "licence": s.licence, "credit": s.credit,
                     "train_files": len(s.train), "dev_files": len(s.dev)} for s in found],
        "left_out_files": dict(left_out),
        "splits": {TRAIN: write_split(staging, TRAIN, train_items, workers),
                   DEV: write_split(staging, DEV, dev_items, workers)},
    }
    manifest["seconds"] = round(time.time() - started, 1)
    shutil.rmtree(staging / "parts")
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return manifest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("runs/shards"))
    parser.add_argument("--sources", default="pop909,groove", help="comma-separated: " + ", ".join(RECIPES)
                        + " (none: only --folder)")
    parser.add_argument("--cache", type=Path, help="where recipes that convert files keep them (default: OUT.cache)")
    parser.add_argument("--folder", type=Path, help="also every MIDI file under this folder")
    parser.add_argument("--folder-licence", help="the licence of --folder's files (required with --folder)")
    parser.add_argument("--folder-credit", default="", help="who to credit for --folder's files")
    parser.add_argument("--steps-per-qn", type=int, help="tempo-relative wait steps per quarter note "
                        "(default: 8 ms real-time steps, as the paper and the public checkpoints)")
    parser.add_argument("--augment", type=int, default=2, help="role-drawn copies of each train file")
    parser.add_argument("--workers", type=int, default=max(1, multiprocessing.cpu_count()))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue OUT.partial from its last whole part")
    args = parser.parse_args(argv)
    if args.folder and not args.folder_licence:
        parser.error("--folder needs --folder-licence: the bundle records the licence of its training data")
    names = [name for name in args.sources.split(",") if name and name != "none"]
    found = sources(args.data, names, args.cache or args.out.with_name(args.out.name + ".cache"))
    if args.folder:
        found.append(folder(args.folder, args.folder_licence, args.folder_credit))
    manifest = prepare(args.data, args.out, found, args.augment, args.workers, args.seed,
                       TimeUnit(args.steps_per_qn), args.resume)
    for split, summary in manifest["splits"].items():
        unreadable = sum(failure["count"] for failure in summary["unreadable_files"])
        print(f"{split}: {summary['documents']} documents, {summary['tokens']} tokens, {unreadable} unreadable files")
    for reason, count in manifest["left_out_files"].items():
        print(f"left out: {count} {reason}")
    print(f"wrote {args.out} in {manifest['seconds']} s ({manifest['time_unit']})")


if __name__ == "__main__":
    main()
