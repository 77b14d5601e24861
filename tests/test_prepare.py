"""Token shards from real MIDI: time unit and role copies recorded, duplicates and broken files
counted, interrupted runs resumed, and a model trained on them exported with its tokenizer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from cmi_daemon.inference.bundle import load_bundle
from cmi_daemon.music import vocab
from cmi_daemon.music.timeunit import QUARTER_NOTE_24
from cmi_daemon.music.tokens import read_midi, tokenize
from export.__main__ import main as export_main
from tests.conftest import ALL_FIXTURES, GROOVE_FIXTURES, POP909_FIXTURES
from training import train
from training.data import batches
from training.data.prepare import prepare, work_items, write_split
from training.data.recipes import Source, folder

SMOKE = ["--config", "smoke", "--eval-interval", "2", "--dev-examples", "4"]


def fixture_source(paths=ALL_FIXTURES, dev=(POP909_FIXTURES[0], GROOVE_FIXTURES[0])) -> Source:
    return Source("fixtures", "MIT and CC BY 4.0", "tests/fixtures/midi/README.md", tuple(paths), tuple(dev))


@pytest.fixture(scope="module")
def qn_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("qn") / "shards"
    prepare(out.parent, out, [fixture_source()], n_augmented=1, workers=1, seed=0, unit=QUARTER_NOTE_24)
    return out


def test_shards_record_their_time_unit_and_role_copies(qn_shards):
    manifest = json.loads((qn_shards / "manifest.json").read_text())
    assert manifest["tokenizer"] == {"steps_per_qn": 24, "role_bins": True}
    # The two dev files are left out of train, each other train file is written twice.
    assert manifest["left_out_files"] == {"train file with the content of an earlier file": 2}
    n_train = len(ALL_FIXTURES) - 2
    assert manifest["splits"]["train"]["documents"] == 2 * n_train
    shard = batches.TokenShard(qn_shards, "train")
    assert shard.time_unit == QUARTER_NOTE_24
    first = read_midi([p for p in ALL_FIXTURES if p not in (POP909_FIXTURES[0], GROOVE_FIXTURES[0])][0])
    expected = tokenize(QUARTER_NOTE_24.token_song(first)).ids
    assert shard.tokens[shard.offsets[0]:shard.offsets[1]].tolist() == expected
    copy_bins = {vocab.note_bin(int(t)) for t in shard.tokens[shard.offsets[1]:shard.offsets[2]]
                 if vocab.is_note(int(t))}
    assert len(copy_bins) >= 2  # the copy's tracks play bins by role, not all piano


def test_duplicates_and_broken_files_are_counted_by_cause(tmp_path):
    data = tmp_path / "collection"
    data.mkdir()
    for index, path in enumerate(ALL_FIXTURES):
        shutil.copy(path, data / f"{index}.mid")
    shutil.copy(ALL_FIXTURES[0], data / "again.mid")
    (data / "broken.mid").write_bytes(b"MThd\x00\x00\x00\x06\x00\x01")
    (data / "notes.txt").write_text("not a MIDI file")
    source = folder(data, "CC0", "a test collection")
    assert source == folder(data, "CC0", "a test collection")  # the split is the content's, not the run's
    out = tmp_path / "shards"
    manifest = prepare(tmp_path, out, [source], 0, workers=1, seed=0)
    assert sum(manifest["left_out_files"].values()) == 1  # again.mid, in whichever split its content is
    unreadable = manifest["splits"]["train"]["unreadable_files"] + manifest["splits"]["dev"]["unreadable_files"]
    assert unreadable == [{"error": "MidiFileError", "count": 1,
                           "cause": "FILE: the file ends in the middle of the MIDI data (truncated?)"}]
    n_documents = manifest["splits"]["train"]["documents"] + manifest["splits"]["dev"]["documents"]
    assert n_documents == len(ALL_FIXTURES)
    assert manifest["sources"][0]["licence"] == "CC0"


def test_an_interrupted_run_keeps_its_finished_parts(tmp_path):
    items = list(work_items(ALL_FIXTURES, 0, 0))
    out = tmp_path / "shards"
    summary = write_split(out, "train", items, workers=1)
    first = np.fromfile(out / "train.tokens.u16", dtype=np.uint16)
    part = out / "parts" / "train-00000.u16"
    marked = np.full(part.stat().st_size // 2, vocab.wait_id(5), dtype=np.uint16)
    marked.tofile(part)  # a finished part is never tokenized again: its tokens come back as they are
    again = write_split(out, "train", items, workers=1)
    tokens = np.fromfile(out / "train.tokens.u16", dtype=np.uint16)
    assert again["documents"] == summary["documents"] and len(tokens) == len(first)
    assert (tokens[:len(marked)] == vocab.wait_id(5)).all()
    (out / "parts" / "train-00000.json").unlink()  # an unfinished part is done again
    write_split(out, "train", items, workers=1)
    assert np.array_equal(np.fromfile(out / "train.tokens.u16", dtype=np.uint16), first)


def test_a_model_trained_on_tempo_relative_shards_exports_its_time_unit(qn_shards, tmp_path):
    out = tmp_path / "generator"
    train.main(["--stage", "generator", "--conditioning", "off", "--shards", str(qn_shards), "--out", str(out),
                *SMOKE, "--max-steps", "1"])
    assert torch.load(out / "last.pt", weights_only=True)["tokenizer"] == {"steps_per_qn": 24, "role_bins": True}
    assert export_main([str(out / "last.pt"), "--out", str(tmp_path / "bundle")]) == 0
    tokenizer = load_bundle(tmp_path / "bundle").tokenizer
    assert tokenizer.time_unit == QUARTER_NOTE_24 and tokenizer.role_bins


def test_stage_two_refuses_a_jepa_of_another_time_unit(qn_shards, tmp_path):
    real_time = tmp_path / "ms"
    prepare(tmp_path, real_time, [fixture_source()], 0, workers=1, seed=0)
    jepa = tmp_path / "jepa"
    train.main(["--stage", "jepa", "--shards", str(real_time), "--out", str(jepa), *SMOKE, "--max-steps", "1"])
    with pytest.raises(ValueError, match="8 ms of real time a step.*1/24 quarter note"):
        train.main(["--stage", "generator", "--shards", str(qn_shards), "--jepa", str(jepa),
                    "--out", str(tmp_path / "generator"), *SMOKE, "--max-steps", "1"])


def test_training_examples_are_drawn_in_many_keys_and_dev_examples_as_written(qn_shards):
    shard = batches.TokenShard(qn_shards, "train")
    spans = batches.BlankConfig(time_aligned_fraction=0.0)
    plain = batches.ExampleStream(shard, "generator", 256, 1, spans)
    augmented = batches.ExampleStream(shard, "generator", 256, 1, spans, augmented=True)
    text = shard.tokens.tobytes()
    n_pitched = n_moved = 0
    for index in range(40):
        split = plain.split(index)
        music = split.prefix + split.blank + split.suffix
        assert np.asarray(music, dtype=np.uint16).tobytes() in text  # a window of the shard as written
        if not any(vocab.is_note(t) and vocab.note_bin(t) != vocab.PERCUSSION_BIN for t in music):
            continue  # drums keep their keys
        moved = augmented.split(index)
        n_pitched += 1
        n_moved += moved.prefix + moved.blank + moved.suffix != music
    assert n_pitched >= 10 and n_moved >= 0.8 * n_pitched  # 35 of 36 key and loudness draws change a window
