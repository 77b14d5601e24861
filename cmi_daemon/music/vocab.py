"""Token ids of the RWKV-4-MIDI vocabulary plus the three infilling tokens: all token arithmetic,
of one token and of token streams (note-ons, the steps a stream spans, its onset steps).

Ids match the public MIDI-LLM-tokenizer vocabulary (20,096 ids) used by the RWKV-4 music
checkpoints, followed by `<mask>`, `<sep>` and `<ans>` (docs: ../shared/docs/vocabulary.md).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

PAD_ID = 0
START_ID = 1
END_ID = 2

WAIT_STEP_MS = 8.0
"""Real time of one wait step: 1000 ms / 125."""
MAX_WAIT_STEPS_PER_TOKEN = 125
WAIT_ID_OFFSET = 2
"""A wait of k steps (1..125) has id WAIT_ID_OFFSET + k."""
FIRST_WAIT_ID = WAIT_ID_OFFSET + 1
LAST_WAIT_ID = WAIT_ID_OFFSET + MAX_WAIT_STEPS_PER_TOKEN

N_PITCHES = 128
N_VELOCITY_BINS = 12
N_INSTRUMENT_BINS = 13
NOTE_ID_OFFSET = 128
FIRST_NOTE_ID = NOTE_ID_OFFSET
LAST_NOTE_ID = NOTE_ID_OFFSET + N_INSTRUMENT_BINS * N_PITCHES * N_VELOCITY_BINS - 1

PUBLIC_VOCAB_SIZE = LAST_NOTE_ID + 1
"""Rows of `emb` and `head` in the public RWKV-4-MIDI checkpoints (20,096)."""
MASK_ID = PUBLIC_VOCAB_SIZE
SEP_ID = PUBLIC_VOCAB_SIZE + 1
ANS_ID = PUBLIC_VOCAB_SIZE + 2
VOCAB_SIZE = PUBLIC_VOCAB_SIZE + 3
VOCAB_ID = "rwkv4-midi-20096+ilm3"
"""Names this id layout in model bundles, so a bundle for another vocabulary is refused."""

SPECIAL_TEXT = {PAD_ID: "<pad>", START_ID: "<start>", END_ID: "<end>",
                MASK_ID: "<mask>", SEP_ID: "<sep>", ANS_ID: "<ans>"}
_SPECIAL_IDS = {text: token_id for token_id, text in SPECIAL_TEXT.items()}

PERCUSSION_BIN = 0
"""Anything on MIDI channel 10; the key number is the pitch."""
BIN_NAMES = ("p", "d", "t", "m", "b", "g", "v", "tr", "pi", "s", "f", "l", "pa")
_BIN_BY_NAME = {name: index for index, name in enumerate(BIN_NAMES)}
_BIN_PROGRAMS = {
    1: [47, 116, 117, 118],
    2: [57, 58],
    3: list(range(8, 17)) + list(range(112, 116)),
    4: list(range(32, 40)) + [42, 43],
    5: list(range(24, 32)) + list(range(104, 109)),
    6: [40, 41, 44, 45, 46] + list(range(48, 55)) + [85, 91, 110],
    7: [56] + list(range(59, 64)) + [69],
    8: list(range(0, 8)) + list(range(17, 24)),
    9: list(range(64, 69)) + [70, 71, 109, 111],
    10: list(range(72, 80)),
    11: list(range(80, 85)) + [86, 87],
    12: [88, 89, 90] + list(range(92, 96)),
}
PROGRAM_TO_BIN: tuple[Optional[int], ...] = tuple(
    next((b for b, programs in _BIN_PROGRAMS.items() if program in programs), None)
    for program in range(128))
"""General MIDI program (0-based) -> instrument bin; None for programs the vocabulary drops."""
FALLBACK_BIN = 12
"""Bin for a DAW track whose program has none (55, 96-103, 119-127: effects), so its notes are kept."""
BIN_STAND_IN_PROGRAM = (0, 118, 58, 12, 32, 25, 40, 56, 0, 66, 73, 80, 88)
"""Program written for each bin when decoding to a file (percussion goes to channel 10)."""

VELOCITY_BIN_UPPER = (0, 8, 17, 27, 37, 47, 58, 70, 83, 97, 111, 127)
"""Largest velocity of each bin; decoding writes exactly these velocities."""


def wait_id(n_steps: int) -> int:
    """Id of a single wait token of 1..125 steps."""
    if not 1 <= n_steps <= MAX_WAIT_STEPS_PER_TOKEN:
        raise ValueError(f"a wait token holds 1..{MAX_WAIT_STEPS_PER_TOKEN} steps, not {n_steps}")
    return WAIT_ID_OFFSET + n_steps


def wait_ids(n_steps: int) -> list[int]:
    """Wait tokens for a gap of n_steps: whole t125s then one remainder (none for 0)."""
    if n_steps < 0:
        raise ValueError(f"a gap cannot be negative ({n_steps} steps)")
    full, rest = divmod(n_steps, MAX_WAIT_STEPS_PER_TOKEN)
    ids = [LAST_WAIT_ID] * full
    if rest:
        ids.append(WAIT_ID_OFFSET + rest)
    return ids


def is_wait(token_id: int) -> bool:
    return FIRST_WAIT_ID <= token_id <= LAST_WAIT_ID


def wait_steps(token_id: int) -> int:
    """Steps of a wait token (0 for any other token)."""
    return token_id - WAIT_ID_OFFSET if is_wait(token_id) else 0


def is_note(token_id: int) -> bool:
    return FIRST_NOTE_ID <= token_id <= LAST_NOTE_ID


def note_id(instrument_bin: int, pitch: int, velocity_bin: int) -> int:
    """Id of a note event; velocity_bin 0 is a note-off, 1..11 a note-on."""
    if not (0 <= instrument_bin < N_INSTRUMENT_BINS and 0 <= pitch < N_PITCHES
            and 0 <= velocity_bin < N_VELOCITY_BINS):
        raise ValueError(f"no note token for bin {instrument_bin}, pitch {pitch}, velocity bin {velocity_bin}")
    return NOTE_ID_OFFSET + instrument_bin * N_PITCHES * N_VELOCITY_BINS + pitch * N_VELOCITY_BINS + velocity_bin


def note_fields(token_id: int) -> tuple[int, int, int]:
    """(instrument_bin, pitch, velocity_bin) of a note token."""
    if not is_note(token_id):
        raise ValueError(f"token {token_id} is not a note event")
    rest = token_id - NOTE_ID_OFFSET
    instrument_bin, rest = divmod(rest, N_PITCHES * N_VELOCITY_BINS)
    pitch, velocity_bin = divmod(rest, N_VELOCITY_BINS)
    return instrument_bin, pitch, velocity_bin


def note_bin(token_id: int) -> int:
    """Instrument bin of a note token."""
    return (token_id - NOTE_ID_OFFSET) // (N_PITCHES * N_VELOCITY_BINS)


def is_note_on(token_id: int) -> bool:
    """A note event with a velocity (bin 1..11); velocity bin 0 is a note-off."""
    return is_note(token_id) and (token_id - NOTE_ID_OFFSET) % N_VELOCITY_BINS > 0


def total_steps(token_ids) -> int:
    """Wait steps a token stream spans: the sum of its waits."""
    return sum(wait_steps(t) for t in token_ids)


def note_on_count(token_ids, bins=None) -> int:
    """Note-ons in a token stream; only those of the instrument bins in `bins` when it is given."""
    return sum(1 for t in token_ids if is_note_on(t) and (bins is None or note_bin(t) in bins))


def onset_steps(token_ids) -> list[int]:
    """The steps (counted from the stream's start) at which note-ons start, each once, in order."""
    steps, clock = [], 0
    for token_id in token_ids:
        clock += wait_steps(token_id)
        if is_note_on(token_id) and (not steps or steps[-1] != clock):
            steps.append(clock)
    return steps


def transposed_ids(token_ids, semitones: int, velocity_bin_shift: int = 0) -> np.ndarray:
    """Token ids (any int array) with note events of pitched bins moved by semitones (a pitch
    leaving 0..127 moves back by octaves; percussion keys name drums and stay) and every note-on's
    velocity bin by velocity_bin_shift (kept within 1..11); all other ids unchanged."""
    ids = np.asarray(token_ids, dtype=np.int64)
    result = ids.copy()
    is_note_event = (ids >= FIRST_NOTE_ID) & (ids <= LAST_NOTE_ID)
    fields = ids[is_note_event] - NOTE_ID_OFFSET
    instrument_bin = fields // (N_PITCHES * N_VELOCITY_BINS)
    pitch = fields // N_VELOCITY_BINS % N_PITCHES
    velocity_bin = fields % N_VELOCITY_BINS
    pitch = np.where(instrument_bin != PERCUSSION_BIN, pitch + semitones, pitch)
    pitch = np.where(pitch < 0, pitch + 12 * ((11 - pitch) // 12), pitch)
    pitch = np.where(pitch >= N_PITCHES, pitch - 12 * ((pitch - N_PITCHES) // 12 + 1), pitch)
    velocity_bin = np.where(velocity_bin > 0, np.clip(velocity_bin + velocity_bin_shift, 1, N_VELOCITY_BINS - 1), 0)
    result[is_note_event] = NOTE_ID_OFFSET + (instrument_bin * N_PITCHES + pitch) * N_VELOCITY_BINS + velocity_bin
    return result


def velocity_to_bin(velocity: float) -> int:
    """Velocity (0..127, may be fractional after CC7/CC11 mixing) -> bin 0..11."""
    for velocity_bin, upper in enumerate(VELOCITY_BIN_UPPER):
        if velocity <= upper:
            return velocity_bin
    return N_VELOCITY_BINS - 1


def bin_to_velocity(velocity_bin: int) -> int:
    return VELOCITY_BIN_UPPER[velocity_bin]


def program_to_bin(program: int, is_drum: bool) -> Optional[int]:
    """Instrument bin of a track; None where the reference drops the program."""
    if is_drum:
        return PERCUSSION_BIN
    if not 0 <= program < 128:
        raise ValueError(f"program {program} is not a General MIDI program (0..127)")
    return PROGRAM_TO_BIN[program]


def token_text(token_id: int) -> str:
    """Text form of one id: `t12`, `pi:3c:a`, `<mask>`."""
    if token_id in SPECIAL_TEXT:
        return SPECIAL_TEXT[token_id]
    if is_wait(token_id):
        return f"t{wait_steps(token_id)}"
    if is_note(token_id):
        instrument_bin, pitch, velocity_bin = note_fields(token_id)
        return f"{BIN_NAMES[instrument_bin]}:{pitch:x}:{velocity_bin:x}"
    raise ValueError(f"token id {token_id} is outside the vocabulary (0..{VOCAB_SIZE - 1})")


def text_token(text: str) -> int:
    """Id of one token's text form (inverse of token_text)."""
    if text in _SPECIAL_IDS:
        return _SPECIAL_IDS[text]
    try:
        if text[:1] == "t" and text[1:2].isdigit():
            return wait_id(int(text[1:]))
        name, pitch_hex, velocity_hex = text.split(":")
        return note_id(_BIN_BY_NAME[name], int(pitch_hex, 16), int(velocity_hex, 16))
    except (KeyError, ValueError) as error:
        raise ValueError(f"{text!r} is not a token of the vocabulary") from error


def ids_to_text(token_ids) -> str:
    return " ".join(token_text(int(t)) for t in token_ids)


def text_to_ids(text: str) -> list[int]:
    return [text_token(part) for part in text.split()]
