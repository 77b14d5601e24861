"""Inference: a model bundle run with ONNX Runtime turns an infill request into candidate answers.

One request: region (regions.region_in_window) -> context encoder + predictor (the base model's, or
a DIL profile's adapted weights, see install_profile_weights) -> conditioning
vector (its blank has region.expected_answer_tokens() positions) -> prefill of
`prefix <mask> suffix <sep>` in fixed-length chunks carrying the state -> N candidates decoded
as one batch (one graph call per step for all of them) under the constraints of `sampling`.

The Engine is what the server calls: `Engine(bundle_dir).infill(song, start_qn, end_qn, tracks,
options, cancel=..., progress=...)`. Calls are serialised by a lock, so one worker thread (or
several) may share an engine.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import onnxruntime as ort
import psutil
from safetensors import safe_open

from ..music import vocab
from .bundle import (CONTEXT_ENCODER_GRAPH, GENERATOR_WEIGHTS, PREDICTOR_GRAPH, PREFILL_GRAPH, PROFILE_GRAPHS,
                     STEP_GRAPH, Bundle, load_bundle)
from ..errors import CMIError, InfillCancelled
from ..music.regions import Region, answer_notes, jepa_sequence, region_in_window
from ..music.repeats import Repeat, find_repeat
from .controls import ControlRequest, TrackControls, resolve_controls, snap_to_grid
from .device import onnx_providers, quiet_onnx_runtime
from .sampling import (MAX_SEED, AnswerRows, AnswerState, RepeatGuide, SamplingOptions, TrackConstraints,
                       fixed_events, held_keys, pitch_owners, requires_note, sample_row)
from ..music.timeunit import MS_PER_MINUTE
from ..music.tokens import Note, Song

MIN_ANSWER_CAP_TOKENS = 64
ANSWER_CAP_FACTOR = 3
"""Sampled answer tokens stop at max(MIN_ANSWER_CAP_TOKENS, ANSWER_CAP_FACTOR x the blank's expected length)."""
EMPTY_LOG_SCALE = -1e30
ATT_PP = 3
"""The empty recurrent state, as model.rwkv defines it (repeated here: the engine does not import torch)."""
PROFILE_SESSIONS_IN_MEMORY = 8
"""DIL profiles whose adapted encoder and predictor sessions stay built; others are rebuilt from
their saved weights on their next infill."""


@dataclass(frozen=True)
class InfillOptions:
    n_candidates: int = 1
    seed: Optional[int] = None
    """0..MAX_SEED: same seed, same notes; None draws one (reported in the result). Candidate k is
    drawn with candidate_seeds(seed, n)[k]: that seed and one candidate draw it again."""
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    max_answer_tokens: Optional[int] = None
    """Cap on sampled answer tokens (default: from the blank's expected length)."""
    controls: Optional[dict[int, ControlRequest]] = field(default_factory=dict)
    """Target track -> what the musician sets of its controls; a track not named takes its context's.
    None: no controls at all (nor a repeat guide), the model's notes under the range's constraints alone."""
    follow_repeat: float = 1.0
    """0..1: how closely the infill follows the song's own repeat of the range where it has one
    (`repeats.find_repeat`; the sampler's `RepeatGuide`); 0 leaves the model to itself."""

    def __post_init__(self):
        if self.n_candidates < 1:
            raise CMIError(f"{self.n_candidates} candidates asked for: ask for 1 or more")
        if not 0.0 <= self.follow_repeat <= 1.0:
            raise CMIError(f"follow_repeat {self.follow_repeat:g}: choose a value in 0..1")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise CMIError(f"seed {self.seed} is out of range: use 0..{MAX_SEED}")


@dataclass
class Candidate:
    index: int
    notes: dict[int, list[Note]]
    """Target track index -> new notes, all inside the range."""
    answer_ids: list[int]
    """The answer's tokens, ending with `<ans>`."""
    n_sampled_tokens: int
    decode_ms: float
    """From the start of decoding until this candidate's `<ans>`."""
    seed: int
    """The seed its random numbers came from: with one candidate, this seed draws them again."""

    @property
    def n_tokens(self) -> int:
        return len(self.answer_ids)


@dataclass
class InfillResult:
    start_qn: float
    end_qn: float
    target_tracks: tuple[int, ...]
    seed: int
    """The request's seed (given or drawn): candidate 0's."""
    candidates: list[Candidate]
    n_prompt_tokens: int
    n_blank_tokens: int
    """Positions the predictor filled (the blank's expected answer length)."""
    timings_ms: dict[str, float]
    """region, conditioning, prefill, decode, total."""
    controls: dict[int, TrackControls] = field(default_factory=dict)
    """Target track -> the controls its notes were sampled under."""
    repeat: Optional[Repeat] = None
    """The song's repeat of the range that guided the candidates, if any."""


ProgressCallback = Callable[[float], None]
"""Called during decoding with the fraction of the range the candidates have covered (0..1)."""
CancelCallback = Callable[[], bool]
"""Polled between graph calls; True stops the request with InfillCancelled."""


def default_intra_op_threads() -> int:
    """Physical cores less one, left to the DAW's audio engine. Measured on a 2-core machine with
    another process busy: 1 thread decodes and prefills 2-2.5x faster than 2 threads contending."""
    return max(1, physical_cores() - 1)


def physical_cores() -> int:
    """Physical CPU cores this process may use (hyper-threads do not speed up matrix products): the
    machine's physical cores, at most the logical CPUs the process may run on (its affinity, where
    the platform has one), at least 1."""
    process = psutil.Process()
    usable = len(process.cpu_affinity()) if hasattr(process, "cpu_affinity") else (psutil.cpu_count() or 1)
    return max(1, min(usable, psutil.cpu_count(logical=False) or usable))


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # RWKV's decaying state produces denormal floats, which are very slow on CPUs.
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    return options


def jepa_session_options(intra_op_threads: int) -> ort.SessionOptions:
    """The context encoder's and predictor's: without ONNX Runtime's memory pattern, which is planned
    per input shape and allocated on a shape's second run as one block of its peak size, beside the
    arena's free chunks. Their shapes follow each request's context, so a pattern is seldom reused:
    measured on the default model at full windows, it held 29 MiB of arena against 13 without, and
    saved no time."""
    options = session_options(intra_op_threads)
    options.enable_mem_pattern = False
    return options


def blank_positions(region: Region, n_blank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(context token ids, context positions, target positions) of the JEPA sequence prefix + blank + suffix
    with n_blank blank positions (regions.jepa_sequence)."""
    sequence = jepa_sequence(region.prefix_ids, [vocab.PAD_ID] * n_blank, region.suffix_ids)
    context_ids, context_positions = sequence.context()
    return context_ids, context_positions, sequence.target_positions


class Engine:
    """A loaded model bundle: ONNX Runtime sessions, the head weights and the infill pipeline."""

    def __init__(self, bundle_dir, intra_op_threads: Optional[int] = None, providers: Optional[Sequence[str]] = None):
        self.bundle: Bundle = load_bundle(bundle_dir)
        self.config = self.bundle.model_config
        self.providers = list(providers or onnx_providers())
        self.intra_op_threads = intra_op_threads or default_intra_op_threads()
        options = session_options(self.intra_op_threads)

        def session(name: str, options: ort.SessionOptions = options) -> ort.InferenceSession:
            # From the path, not bytes: the graphs' weights are external data in the bundle's safetensors,
            # found relative to the graph file; the fp16 -> fp32 Casts are folded at session creation.
            return ort.InferenceSession(str(self.bundle.file(name)), options, providers=self.providers)

        with quiet_onnx_runtime():
            self.step_session = session(STEP_GRAPH)
        self.providers = self.step_session.get_providers()
        """The providers really in use (a provider that failed to load is not among them): every
        other session asks for these."""
        self.prefill_session = session(PREFILL_GRAPH)
        jepa_options = jepa_session_options(self.intra_op_threads)
        self.encoder_session = session(CONTEXT_ENCODER_GRAPH, jepa_options) if self.bundle.conditioned else None
        self.predictor_session = session(PREDICTOR_GRAPH, jepa_options) if self.bundle.conditioned else None
        with safe_open(str(self.bundle.file(GENERATOR_WEIGHTS)), framework="numpy") as weights:
            self.head = np.ascontiguousarray(weights.get_tensor("head.weight"), dtype=np.float32)  # stored fp16
        self.chunk_tokens = self.bundle.tokenizer.prefill_chunk_tokens
        self._lock = threading.Lock()
        self.idle = threading.Event()
        """Set while no infill runs: background work (DIL) waits for it between steps."""
        self.idle.set()
        self._profile_sessions: OrderedDict[str, tuple] = OrderedDict()
        """Profile -> (encoder session, predictor session, the OrtValues they read) of adapted weights,
        the most recently used last; at most PROFILE_SESSIONS_IN_MEMORY."""
        self._profile_generation: dict[str, int] = {}
        """Profile -> installs so far: a reload from disk that an install overtook is not kept."""
        self._profiles_lock = threading.Lock()
        self.saved_profile_weights: Optional[Callable[[str], Optional[dict]]] = None
        """Reads a profile's adapted weights back (the DIL learner's store) when its sessions were
        dropped from memory; None: profiles not in memory get the base model."""

    # -----------------------------------------------------------------------------------------
    # DIL profiles: the same graphs with some initializers replaced

    def jepa_initializers(self) -> dict[str, dict[str, str]]:
        """Graph file -> initializer name -> the JEPA state-dict key of the one weight it holds, for the
        encoder and predictor (the bundle manifest's graph_weights): the initializers a profile replaces."""
        if not self.bundle.conditioned:
            return {}
        return {graph: self.bundle.own_weight_initializers(graph) for graph in PROFILE_GRAPHS}

    def install_profile_weights(self, profile: str, weights: Optional[dict[str, dict[str, np.ndarray]]]) -> None:
        """Serve the profile's next infills with these initializer values (graph file -> name -> array),
        or with the base model's when weights is None. Sessions are built here, on the caller's thread,
        and swapped in whole: an infill uses either the old pair or the new one. They run without
        graph optimisations: with them, ONNX Runtime 1.31 folds the Cast of an fp16 weight stored as
        external data before applying add_initializer, and the replacement is silently lost."""
        sessions = None if weights is None else self._build_profile_sessions(weights)
        with self._profiles_lock:
            self._profile_generation[profile] = self._profile_generation.get(profile, 0) + 1
            self._keep_profile_sessions(profile, sessions)

    def _build_profile_sessions(self, weights: dict[str, dict[str, np.ndarray]]) -> tuple:
        built = []
        values = []
        for graph in PROFILE_GRAPHS:
            options = jepa_session_options(self.intra_op_threads)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            for name, array in weights.get(graph, {}).items():
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
                options.add_initializer(name, value)
                values.append(value)
            built.append(ort.InferenceSession(str(self.bundle.file(graph)), options, providers=self.providers))
        return built[0], built[1], values

    def _keep_profile_sessions(self, profile: str, sessions: Optional[tuple]) -> None:
        """Under _profiles_lock: store (or, for None, drop) a profile's sessions, evicting the least
        recently used beyond PROFILE_SESSIONS_IN_MEMORY."""
        if sessions is None:
            self._profile_sessions.pop(profile, None)
            return
        self._profile_sessions[profile] = sessions
        self._profile_sessions.move_to_end(profile)
        while len(self._profile_sessions) > PROFILE_SESSIONS_IN_MEMORY:
            self._profile_sessions.popitem(last=False)

    def _jepa_sessions(self, profile: Optional[str]) -> tuple:
        """The profile's (encoder, predictor) sessions: in memory, else rebuilt from its saved weights,
        else the base model's."""
        if profile is None:
            return self.encoder_session, self.predictor_session
        with self._profiles_lock:
            adapted = self._profile_sessions.get(profile)
            if adapted is not None:
                self._profile_sessions.move_to_end(profile)
                return adapted[:2]
            generation = self._profile_generation.get(profile, 0)
        weights = self.saved_profile_weights(profile) if self.saved_profile_weights is not None else None
        if weights is None:
            return self.encoder_session, self.predictor_session
        sessions = self._build_profile_sessions(weights)
        with self._profiles_lock:
            overtaken = self._profile_generation.get(profile, 0) != generation or profile in self._profile_sessions
            if not overtaken:
                self._keep_profile_sessions(profile, sessions)
        return self._jepa_sessions(profile) if overtaken else sessions[:2]

    # -----------------------------------------------------------------------------------------
    # graph calls

    def empty_state(self, batch_size: int) -> np.ndarray:
        generator = self.config.generator
        state = np.zeros((generator.n_layer, 5, batch_size, generator.n_embd), dtype=np.float32)
        state[:, ATT_PP] = EMPTY_LOG_SCALE
        return state

    def _generator_inputs(self, token_ids, state, head_rows, cond) -> dict:
        inputs = {"token_ids": token_ids, "state": state, "head_rows": head_rows}
        if self.bundle.conditioned:
            inputs["cond"] = cond
        return inputs

    def step(self, token_ids: np.ndarray, state: np.ndarray, head_rows: np.ndarray,
             cond: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """One token per sequence (B,) -> (logits over head_rows (B, R), new state)."""
        logits, state = self.step_session.run(None, self._generator_inputs(
            np.ascontiguousarray(token_ids, dtype=np.int64), state, head_rows, cond))
        return logits, state

    def prefill(self, prompt_ids: Sequence[int], head_rows: np.ndarray, cond: Optional[np.ndarray],
                cancel: Optional[CancelCallback] = None) -> tuple[np.ndarray, np.ndarray]:
        """A whole prompt for one sequence -> (logits over head_rows after its last token (1, R), state).

        Whole chunks go through the prefill graph, the remainder through the step graph."""
        prompt = np.asarray(prompt_ids, dtype=np.int64)
        if prompt.size == 0:
            raise ValueError("an empty prompt has no next-token logits")
        state = self.empty_state(1)
        n_whole = len(prompt) // self.chunk_tokens * self.chunk_tokens
        logits = None
        for start in range(0, n_whole, self.chunk_tokens):
            _check_cancel(cancel)
            chunk = prompt[None, start:start + self.chunk_tokens]
            logits, state = self.prefill_session.run(None, self._generator_inputs(chunk, state, head_rows, cond))
        for token_id in prompt[n_whole:]:
            logits, state = self.step(token_id[None], state, head_rows, cond)
        return logits, state

    def conditioning(self, region: Region, n_blank: int, profile: Optional[str] = None) -> np.ndarray:
        """The generator's conditioning vector (1, E): the predictor's mean over n_blank blank positions,
        with the profile's adapted encoder and predictor when it has any."""
        encoder_session, predictor_session = self._jepa_sessions(profile)
        context_ids, context_positions, target_positions = blank_positions(region, n_blank)
        context_valid = np.ones(len(context_ids), dtype=bool)
        if len(context_ids) == 0:  # nothing around the blank: one invalid slot keeps the shapes non-empty
            context_ids, context_positions = np.full(1, vocab.PAD_ID, np.int64), np.zeros(1, np.int64)
            context_valid = np.zeros(1, dtype=bool)
        (representations,) = encoder_session.run(None, {
            "token_ids": context_ids[None], "positions": context_positions[None], "valid": context_valid[None]})
        (cond,) = predictor_session.run(None, {
            "context_repr": representations, "context_positions": context_positions[None],
            "context_valid": context_valid[None], "target_positions": target_positions[None],
            "target_valid": np.ones((1, len(target_positions)), dtype=bool)})
        return cond

    # -----------------------------------------------------------------------------------------
    # the request

    def region(self, song: Song, start_qn: float, end_qn: float, target_tracks: Sequence[int]) -> Region:
        """The region of the song as the model reads it (`TokenizerSettings.model_song`), with context
        bounded so that prefix + blank + suffix fits the model's window."""
        return self._region(self.bundle.tokenizer.model_song(song), start_qn, end_qn, target_tracks)

    def _region(self, model_song: Song, start_qn: float, end_qn: float, target_tracks: Sequence[int]) -> Region:
        return region_in_window(model_song, start_qn, end_qn, target_tracks, self.bundle.tokenizer.context_tokens)

    def infill(self, song: Song, start_qn: float, end_qn: float, target_tracks: Sequence[int],
               options: InfillOptions = InfillOptions(), cancel: Optional[CancelCallback] = None,
               progress: Optional[ProgressCallback] = None, profile: Optional[str] = None) -> InfillResult:
        """Candidates for the target tracks' notes in [start_qn, end_qn) of the song (conditioned by the
        DIL profile's adapted weights when given and installed)."""
        with self._lock:
            self.idle.clear()
            try:
                return self._infill(song, start_qn, end_qn, target_tracks, options, cancel, progress, profile)
            finally:
                self.idle.set()

    def _infill(self, song, start_qn, end_qn, target_tracks, options, cancel, progress, profile) -> InfillResult:
        started = time.perf_counter()
        seed = options.seed if options.seed is not None else secrets.randbelow(MAX_SEED + 1)
        song = self.bundle.tokenizer.model_song(song)
        region = self._region(song, start_qn, end_qn, target_tracks)
        n_blank = max(1, min(region.expected_answer_tokens(), self.bundle.tokenizer.context_tokens
                             - len(region.prefix_ids) - len(region.suffix_ids)))
        region_done = time.perf_counter()

        cond = self.conditioning(region, n_blank, profile) if self.bundle.conditioned else None
        conditioning_done = time.perf_counter()

        rows = AnswerRows(region.target_bins)
        head_rows = np.ascontiguousarray(self.head[rows.token_ids])
        prompt = region.ilm_ids()
        logits, state = self.prefill(prompt, head_rows, cond, cancel)
        prefill_done = time.perf_counter()

        cap = options.max_answer_tokens or max(MIN_ANSWER_CAP_TOKENS, ANSWER_CAP_FACTOR * n_blank)
        held = held_keys(song, region)
        repeat = (find_repeat(song, region.start_qn, region.end_qn, region.target_tracks)
                  if options.controls is not None and options.follow_repeat > 0 else None)
        controls = {} if options.controls is None else {
            track: resolve_controls(song, track, region.start_qn, region.end_qn,
                                    options.controls.get(track, ControlRequest()),
                                    repeat.notes[track] if repeat is not None else None)
            for track in region.target_tracks}
        constraints = {track: TrackConstraints.from_controls(c, song, region) for track, c in controls.items()}
        owners = pitch_owners(region, controls) if controls else None
        guide = (RepeatGuide.from_repeat(
            repeat, song, region, constraints, options.follow_repeat * repeat.confidence,
            lengths_set=[t for t, request in options.controls.items() if request.note_length_qn],
            densities_set=[t for t, request in options.controls.items() if request.density_per_qn])
                 if repeat is not None else None)
        answers = self._decode(region, rows, head_rows, logits, state, cond, options, seed, cap, held, constraints,
                               owners, guide, cancel, progress)
        decode_done = time.perf_counter()

        seeds = candidate_seeds(seed, options.n_candidates)
        step_qn = vocab.WAIT_STEP_MS * float(np.max(song.tempo_map.bpm)) / MS_PER_MINUTE  # at the fastest tempo
        candidates = [Candidate(index, snap_to_grid(answer_notes(song, region, answer.answer_ids, owners), controls,
                                             region.start_qn, region.end_qn, step_qn),
                                answer.answer_ids,
                                answer.n_sampled, round((done_at - prefill_done) * 1000.0, 2), seeds[index])
                      for index, (answer, done_at) in enumerate(answers)]
        timings_ms = {name: round(seconds * 1000.0, 2) for name, seconds in (
            ("region", region_done - started), ("conditioning", conditioning_done - region_done),
            ("prefill", prefill_done - conditioning_done), ("decode", decode_done - prefill_done),
            ("total", decode_done - started))}
        return InfillResult(region.start_qn, region.end_qn, region.target_tracks, seed, candidates,
                            len(prompt), n_blank, timings_ms, controls, repeat)

    def _decode(self, region, rows, head_rows, logits, state, cond, options, seed, cap, held, constraints, owners,
                guide, cancel, progress):
        n = options.n_candidates
        events = fixed_events(region)
        need_note = requires_note(region, constraints)
        answers = [AnswerState(rows, region.n_steps, events, need_note, cap, held, constraints, owners, guide)
                   for _ in range(n)]
        rngs = [np.random.default_rng(candidate_seed) for candidate_seed in candidate_seeds(seed, n)]
        done_at = [0.0] * n
        active = list(range(n))
        logits = np.repeat(logits, n, axis=0)
        state = np.repeat(state, n, axis=2)
        cond = np.repeat(cond, n, axis=0) if cond is not None else None
        while active:
            _check_cancel(cancel)
            next_tokens = []
            for slot, index in enumerate(active):
                answer = answers[index]
                token_id = answer.forced_token()
                if token_id is None:
                    bias = answer.row_bias()
                    row = sample_row(logits[slot] if bias is None else logits[slot] + bias, answer.allowed_rows(),
                                     answer.presence, options.sampling, rows.note_on_rows, rngs[index])
                    token_id = answer.sampled_row_token(row)
                    answer.advance(token_id, row)
                else:
                    answer.advance(token_id)
                next_tokens.append(token_id)
            keep = [slot for slot, index in enumerate(active) if not answers[index].done]
            for slot, index in enumerate(active):
                if answers[index].done:
                    done_at[index] = time.perf_counter()
            if progress is not None:
                progress(float(np.mean([1.0 if a.done else min(1.0, a.clock / max(1, a.n_steps)) for a in answers])))
            if len(keep) < len(active):
                state = state[:, :, keep]
                cond = cond[keep] if cond is not None else None
                active = [active[slot] for slot in keep]
                next_tokens = [next_tokens[slot] for slot in keep]
            if active:
                logits, state = self.step(np.array(next_tokens), np.ascontiguousarray(state), head_rows, cond)
        return list(zip(answers, done_at))


def candidate_seeds(seed: int, n_candidates: int) -> list[int]:
    """The seed of each candidate of a request: seed, seed + 1, ... (wrapping past MAX_SEED)."""
    return [(seed + index) % (MAX_SEED + 1) for index in range(n_candidates)]


def _check_cancel(cancel: Optional[CancelCallback]) -> None:
    if cancel is not None and cancel():
        raise InfillCancelled("infill cancelled")
