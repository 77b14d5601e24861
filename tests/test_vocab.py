"""The vocabulary's ids are exactly the public RWKV-4-MIDI ids plus the three infilling tokens; its
stream helpers agree with the decoder on real songs."""

from dataclasses import replace

import pytest

from cmi_daemon.music import vocab
from cmi_daemon.music.tokens import decode_ids, read_midi, tokenize
from conftest import GROOVE_FIXTURES, POP909_FIXTURES


def test_sizes_and_special_ids():
    assert vocab.PUBLIC_VOCAB_SIZE == 20096
    assert vocab.VOCAB_SIZE == 20099
    assert (vocab.PAD_ID, vocab.START_ID, vocab.END_ID) == (0, 1, 2)
    assert (vocab.MASK_ID, vocab.SEP_ID, vocab.ANS_ID) == (20096, 20097, 20098)


def test_ids_from_the_vocabulary_table():
    assert vocab.text_token("t1") == 3
    assert vocab.text_token("t125") == 127
    assert vocab.text_token("p:0:0") == 128
    assert vocab.text_token("pi:3c:a") == 128 + 8 * 1536 + 0x3C * 12 + 10
    assert vocab.text_token("pa:7f:b") == 20095
    assert vocab.token_text(20095) == "pa:7f:b"
    assert vocab.token_text(128 + 1536) == "d:0:0"


def test_every_id_round_trips_through_its_text():
    for token_id in range(vocab.VOCAB_SIZE):
        assert vocab.text_token(vocab.token_text(token_id)) == token_id


def test_tuba_bin_is_not_a_wait():
    assert vocab.note_fields(vocab.text_token("t:3c:5")) == (2, 0x3C, 5)
    assert vocab.is_wait(vocab.text_token("t5"))


@pytest.mark.parametrize("velocity, velocity_bin", [
    (0, 0), (1, 1), (8, 1), (9, 2), (17, 2), (18, 3), (58, 6), (59, 7), (70, 7), (71, 8),
    (111, 10), (112, 11), (127, 11)])
def test_velocity_bins_match_the_reference(velocity, velocity_bin):
    assert vocab.velocity_to_bin(velocity) == velocity_bin
    assert vocab.velocity_to_bin(vocab.bin_to_velocity(velocity_bin)) == velocity_bin


@pytest.mark.parametrize("program, instrument_bin", [
    (0, 8), (7, 8), (8, 3), (16, 3), (17, 8), (24, 5), (32, 4), (42, 4), (40, 6), (47, 1), (55, None),
    (56, 7), (57, 2), (64, 9), (69, 7), (72, 10), (80, 11), (85, 6), (88, 12), (91, 6), (96, None),
    (104, 5), (109, 9), (112, 3), (116, 1), (119, None), (127, None)])
def test_program_bins_match_the_reference(program, instrument_bin):
    assert vocab.program_to_bin(program, is_drum=False) == instrument_bin
    assert vocab.program_to_bin(program, is_drum=True) == vocab.PERCUSSION_BIN


def test_gaps_become_whole_seconds_plus_one_remainder():
    assert vocab.wait_ids(0) == []
    assert vocab.wait_ids(125) == [127]
    assert vocab.wait_ids(300) == [127, 127, 2 + 50]
    with pytest.raises(ValueError):
        vocab.wait_ids(-1)


def test_bad_text_is_refused():
    for text in ("x:1:1", "pi:80:1", "pi:3c:c", "t0", "t126", "<nope>"):
        with pytest.raises(ValueError):
            vocab.text_token(text)


def test_a_note_on_is_a_note_event_with_a_velocity():
    for token_id in range(vocab.VOCAB_SIZE):
        expected = vocab.is_note(token_id) and vocab.note_fields(token_id)[2] > 0
        assert vocab.is_note_on(token_id) == expected, vocab.token_text(token_id)


@pytest.mark.parametrize("path", POP909_FIXTURES[:2] + GROOVE_FIXTURES[:1], ids=lambda p: p.stem)
@pytest.mark.parametrize("lead_steps", [0, 300])
def test_stream_helpers_agree_with_the_decoded_notes_of_a_real_song(path, lead_steps):
    """Steps spanned, onset steps and note-on counts of a song's tokens (after lead_steps of waits)
    are those of the notes the decoder reads back from the same tokens."""
    ids = vocab.wait_ids(lead_steps) + tokenize(read_midi(path)).ids
    notes = decode_ids(ids)
    step = lambda ms: round(ms / vocab.WAIT_STEP_MS)
    assert vocab.total_steps(ids) == max(step(n.start_ms + n.duration_ms) for n in notes)
    assert vocab.onset_steps(ids) == sorted({step(n.start_ms) for n in notes})
    assert vocab.onset_steps(ids)[0] == lead_steps
    assert vocab.note_on_count(ids) == len(notes)


def test_note_ons_are_counted_per_bin():
    """A POP909 song whose melody is played on the flute bin: counted per bin, its notes and the others'."""
    song = read_midi(POP909_FIXTURES[0])
    song.tracks[0] = replace(song.tracks[0], program=73)
    ids = tokenize(song).ids
    notes = decode_ids(ids)
    flute = vocab.program_to_bin(73, False)
    on_flute = sum(n.instrument_bin == flute for n in notes)
    assert 0 < on_flute < len(notes)
    assert vocab.note_on_count(ids, {flute}) == on_flute
    assert vocab.note_on_count(ids, {flute: "a dict's keys"}) == on_flute
    assert vocab.note_on_count(ids, {flute, vocab.program_to_bin(0, False)}) == len(notes)
    assert vocab.note_on_count(ids, set()) == 0
