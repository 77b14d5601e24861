"""Infill metrics on hand-built notes with known answers: overlaps, chords, onsets, groove, bits."""

import math

import numpy as np
import pytest

from cmi_daemon.music import vocab
from cmi_daemon.music.tokens import Note
from training.eval import metrics

PITCH_CLASS = {name: index for index, name in enumerate(metrics.PITCH_CLASS_NAMES)}
QUALITY_INTERVALS = dict(metrics.CHORD_QUALITIES)


def block(pitches, start_qn=0.0, duration_qn=2.0):
    return [Note(start_qn, duration_qn, p, 80) for p in pitches]


def melody(pitches, step_qn=0.5, start_qn=0.0):
    return [Note(start_qn + i * step_qn, step_qn, p, 80) for i, p in enumerate(pitches)]


def test_overlap_identical_disjoint_partial_and_empty():
    a = np.array([2.0, 1.0, 1.0, 0.0])
    assert metrics.overlap(a, a) == pytest.approx(1.0)
    assert metrics.overlap(a, 3 * a) == pytest.approx(1.0)
    assert metrics.overlap(a, np.array([0.0, 0.0, 0.0, 5.0])) == 0.0
    assert metrics.overlap(np.array([1.0, 1.0]), np.array([1.0, 0.0])) == pytest.approx(0.5)
    assert metrics.overlap(np.zeros(4), np.zeros(4)) == 1.0
    assert metrics.overlap(np.zeros(4), a) == 0.0
    with pytest.raises(ValueError):
        metrics.overlap(np.ones(3), np.ones(4))


def test_pitch_class_histogram_counts_notes_across_octaves():
    histogram = metrics.pitch_class_histogram(block([48, 60, 72, 64]) + [Note(0, 16.0, 67, 80)])
    assert histogram[PITCH_CLASS["C"]] == 3 and histogram[PITCH_CLASS["E"]] == 1 and histogram[PITCH_CLASS["G"]] == 1
    assert histogram.sum() == 5
    part = melody([60, 62, 64, 65, 67])
    assert metrics.overlap(metrics.pitch_class_histogram(part), metrics.pitch_class_histogram(part)) == 1.0
    assert metrics.overlap(metrics.pitch_class_histogram(melody([60, 64, 67])),
                           metrics.pitch_class_histogram(melody([61, 66, 70]))) == 0.0


@pytest.mark.parametrize("duration_beats, centre_beats", [
    (1.0, 1.0), (0.5, 0.5), (0.25, 0.25), (0.125, 0.125), (2.0, 2.0), (4.0, 4.0), (8.0, 8.0),
    (1.5, 2 ** 0.5), (0.75, 2 ** -0.5), (1 / 3, 2 ** -1.5), (3.0, 2 ** 1.5),
    (0.95, 1.0), (0.24, 0.25), (0.01, 0.125), (0.0, 0.125), (100.0, 8.0)])
def test_duration_bins_are_nearest_half_octave_centres(duration_beats, centre_beats):
    index = int(metrics.duration_bin(duration_beats))
    assert metrics.DURATION_BIN_CENTRES_BEATS[index] == pytest.approx(centre_beats)


def test_common_durations_get_distinct_bins_and_beats_scale_them():
    common_beats = [0.125, 0.25, 1 / 3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0]
    assert len(set(metrics.duration_bin(common_beats).tolist())) == len(common_beats)
    quarter_notes = block([60], duration_qn=1.0)
    in_eighth_beats = metrics.duration_histogram(quarter_notes, beat_qn=0.5)
    assert metrics.DURATION_BIN_CENTRES_BEATS[int(np.argmax(in_eighth_beats))] == 2.0


def inversions(pitches):
    """Root position and every inversion: the lowest note moved up an octave each time."""
    voicing = sorted(pitches)
    result = [voicing]
    for _ in range(len(pitches) - 1):
        voicing = sorted(voicing[1:] + [voicing[0] + 12])
        result.append(voicing)
    return result


def voicings(root_pitch, intervals):
    close = [root_pitch + i for i in intervals]
    spread = [close[0] - 12] + [p + 12 * (i % 2) for i, p in enumerate(close[1:])]
    doubled = close + [close[0] + 12, close[1] + 24]
    return inversions(close) + [spread, doubled]


@pytest.mark.parametrize("quality", ["maj", "min", "dim", "7", "min7", "maj7", "hdim7"])
@pytest.mark.parametrize("root_name", ["C", "F#", "A", "B"])
def test_chords_in_every_inversion_and_voicing_get_their_root_and_quality(quality, root_name):
    root_pitch = 48 + PITCH_CLASS[root_name]
    for pitches in voicings(root_pitch, QUALITY_INTERVALS[quality]):
        assert metrics.chord_labels(block(pitches), [0.0, 2.0]) == [f"{root_name}:{quality}"], pitches


@pytest.mark.parametrize("root_name", ["C", "E", "G#", "D", "F#", "A#"])
def test_augmented_triads_are_one_label_per_pitch_class_set(root_name):
    root = PITCH_CLASS[root_name]
    lowest = metrics.PITCH_CLASS_NAMES[min((root + i) % 12 for i in (0, 4, 8))]
    for pitches in voicings(48 + root, (0, 4, 8)):
        assert metrics.chord_labels(block(pitches), [0.0, 2.0]) == [f"{lowest}:aug"]


def test_chord_with_melody_passing_tones_and_windows():
    accompaniment = block([48, 52, 55], 0.0, 2.0) + block([45, 48, 52], 2.0, 2.0)
    tune = melody([72, 74, 76, 77, 76, 74, 72, 71])
    labels = metrics.chord_labels(accompaniment + tune, metrics.half_bar_edges_qn([0.0, 4.0]))
    assert labels == ["C:maj", "A:min"]


def test_no_chord_for_silence_and_single_pitch_classes():
    assert metrics.chord_labels([], [0.0, 1.0, 2.0]) == ["N", "N"]
    assert metrics.chord_labels(block([48, 60, 72]), [0.0, 2.0]) == ["N"]
    histogram = metrics.chord_histogram(block([60, 64, 67], 0.0, 1.0), [0.0, 1.0, 2.0])
    assert histogram[metrics.CHORD_LABELS.index("C:maj")] == 1 and histogram[0] == 1


def test_chord_weights_are_sounding_time_inside_the_window():
    held_c_major = block([48, 52, 55], -4.0, 5.0)
    short_f_sharp = block([54, 58, 61], 1.0, 0.1)
    assert metrics.chord_labels(held_c_major + short_f_sharp, [0.0, 2.0]) == ["C:maj"]
    assert metrics.chord_labels(held_c_major, [1.0, 2.0]) == ["N"]


def test_half_bar_edges():
    edges = metrics.half_bar_edges_qn([0.0, 4.0, 7.0])
    assert edges.tolist() == [0.0, 2.0, 4.0, 5.5, 7.0]


def test_onset_f1_copy_shift_and_partial():
    reference = melody([60, 62, 64, 65, 67, 69, 71, 72])
    shifted = lambda notes, qn: [n._replace(start_qn=n.start_qn + qn) for n in notes]
    assert metrics.onset_f1(reference, reference) == 1.0
    assert metrics.onset_f1(shifted(reference, 0.2), reference) == 0.0
    assert metrics.onset_f1(shifted(reference, -0.13), reference) == 0.0
    assert metrics.onset_f1(shifted(reference, 0.1), reference) == 1.0
    assert metrics.onset_f1(shifted(reference, -0.125), reference) == 1.0
    transposed = [n._replace(pitch=n.pitch + 1) for n in reference]
    assert metrics.onset_f1(transposed, reference) == 0.0
    assert metrics.onset_f1(reference[:4], reference) == pytest.approx(2 * 4 / 12)
    assert metrics.onset_f1([], []) == 1.0 and metrics.onset_f1([], reference) == 0.0


def test_onset_matching_is_one_to_one():
    reference = [Note(0.0, 0.1, 60, 80)]
    doubled = [Note(0.0, 0.1, 60, 80), Note(0.05, 0.1, 60, 80)]
    assert metrics.onset_matches(doubled, reference) == 1
    dense = [Note(i * 0.1, 0.1, 60, 80) for i in range(5)]
    assert metrics.onset_matches([n._replace(start_qn=n.start_qn + 0.1) for n in dense], dense) == 5


def test_chroma_cosine_and_pitch_class_entropy():
    part = block([60, 64, 67])
    assert metrics.chroma_cosine(part, part, 0.0, 2.0) == pytest.approx(1.0)
    assert metrics.chroma_cosine(block([61, 66]), part, 0.0, 2.0) == 0.0
    assert metrics.chroma_cosine([], [], 0.0, 2.0) == 1.0
    assert metrics.pitch_class_entropy_bits(melody(range(60, 72))) == pytest.approx(math.log2(12))
    assert metrics.pitch_class_entropy_bits(melody([60, 72, 48])) == 0.0
    assert metrics.pitch_class_entropy_bits([]) == 0.0


def test_onset_grids_and_groove_consistency():
    lines = [0.0, 4.0, 8.0]
    notes = [Note(q, 0.5, 60, 80) for q in (0.0, 1.0, 2.5, 4.0, 5.0, 6.5, 7.99)]
    grids = metrics.onset_grids(notes, lines)
    assert grids.shape == (2, 16)
    assert np.flatnonzero(grids[0]).tolist() == [0, 4, 10]
    assert np.flatnonzero(grids[1]).tolist() == [0, 4, 10]
    assert metrics.groove_consistency(grids[:1], grids[1:]) == 1.0
    other = metrics.onset_grids([Note(q, 0.5, 60, 80) for q in (0.25, 1.25)], [0.0, 4.0])
    assert metrics.groove_consistency(grids[:1], other) == pytest.approx(1 - 5 / 16)
    assert math.isnan(metrics.groove_consistency(grids[:0], grids))


def test_context_overlaps_of_a_part_with_itself_are_one():
    part = block([48, 52, 55], 0.0, 2.0) + melody([72, 74, 76, 77], 0.5, 2.0)
    segment = metrics.Segment(part, part, [0.0, 4.0])
    values = metrics.context_overlaps(segment, segment, segment, beat_qn=1.0)
    assert set(values) == set(metrics.CONTEXT_METRICS)
    assert all(v == pytest.approx(1.0) for v in values.values())


def test_nll_bits_of_a_uniform_model_is_log2_of_the_vocabulary():
    def uniform(ilm_ids, answer_start):
        return np.full(len(ilm_ids) - answer_start, -math.log(vocab.VOCAB_SIZE))

    ids = [vocab.MASK_ID, vocab.SEP_ID] + [vocab.note_id(8, 60, 5), vocab.wait_id(10), vocab.ANS_ID]
    per_token, per_note = metrics.nll_bits(uniform, ids, 2, n_notes=1)
    assert per_token == pytest.approx(math.log2(20099))
    assert per_note == pytest.approx(3 * math.log2(20099))
    assert math.isnan(metrics.nll_bits(uniform, ids, 2, n_notes=0)[1])
    with pytest.raises(ValueError):
        metrics.nll_bits(lambda ids, start: [0.0], ids, 2, n_notes=1)
