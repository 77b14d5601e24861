"""The daemon's DIL: a SignalSink whose work runs on one low-priority background thread.

Signals -> steps:
- `repeat` (the same session infilled again) and `reject`: the content the daemon returned last
  time was not wanted: iteration-wise steps with that content in the range (the unsatisfied
  span) and a random neutral span of the same length in the context;
- `accept`: the current candidate is wanted: sample-wise steps with the accepted version as the
  positive and the session's first version (what the daemon returned first) as the negative;
  an accept of the first version itself has nothing to contrast and makes no step.
After the steps of one signal the profile is saved (store.ProfileStore) and its adapted
encoder and predictor weights are installed in the engine, which uses them from the profile's
next infill on; a profile the engine no longer holds (after a restart, or dropped for others)
is read back from its saved state on its next infill (Learner.saved_graph_weights). The thread
waits while an infill runs (engine.idle), runs torch with one thread at the lowest CPU priority
the platform gives a thread, and never touches the sockets.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..inference.bundle import JEPA_WEIGHTS, BundleError, load_torch_jepa
from ..inference.device import choose_device, flush_denormals_in_this_thread
from ..model.jepa import JEPA
from ..music.regions import JEPASequence, replace_notes_in_range
from .adapter import ProfileModel, graph_weights
from .examples import neutral_span, piece
from .settings import DILSettings
from .store import ProfileStore

log = logging.getLogger("cmi_daemon.dil")

QUEUE_SIZE = 64
"""Signals waiting for the learner; when full, the newest signal is dropped (and logged)."""
SESSION_MEMORY = 256
"""Sessions whose first version the learner remembers, for a later accept."""
LOWEST_NICE = 19
STEP_KINDS = ("iteration", "sample")
"""The learner's two kinds of step (eq. 2 and eq. 3); the daemon takes both."""
PROFILES_IN_MEMORY = 4
"""Profiles whose torch model and optimizer stay loaded; others are read back from disk when needed
(each is saved after every signal, so dropping one loses nothing)."""


def trainable_keys(base: JEPA, initializers: dict[str, dict[str, str]]) -> set[str]:
    """The base JEPA's parameters with an initializer of their own in the graphs (initializers:
    Engine.jepa_initializers). A weight the exporter merged with others of equal value into one
    initializer (fresh LayerNorms) has none and stays frozen, so torch and ONNX agree."""
    own = {key for names in initializers.values() for key in names.values()}
    return own & {key for key, _ in base.named_parameters()}


def served_initializers(base: JEPA, initializers: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """initializers, checked against the base JEPA: every key they name must be one of its weights."""
    state = base.state_dict()
    for graph, names in initializers.items():
        for name, key in names.items():
            if key not in state:
                raise BundleError(f"{graph}: initializer {name} holds {key}, which {JEPA_WEIGHTS} does not have "
                                  "(export the model again)")
    return initializers


def saved_graph_weights(store: ProfileStore, profile: str, initializers: dict[str, dict]) -> Optional[dict]:
    """A profile's saved adapted weights as the engine's graphs take them, or None (saves are atomic,
    so this reads one whole state)."""
    saved = store.load(profile)
    if saved is None:
        return None
    state = {key[len("jepa."):]: tensor for key, tensor in saved.tensors.items() if key.startswith("jepa.")}
    return graph_weights(state, initializers)


def serve_saved_profiles(engine, root: Path) -> None:
    """Let the engine condition on the profiles saved under root without learning anything (offline
    infills read what the daemon learned)."""
    store = ProfileStore(root, engine.bundle.manifest["files"][JEPA_WEIGHTS])
    initializers = engine.jepa_initializers()
    engine.saved_profile_weights = lambda profile: saved_graph_weights(store, profile, initializers)


def lower_thread_priority() -> None:
    """Lowest scheduling priority for the calling thread (Linux: per-thread nice 19)."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOWEST_NICE)
        except OSError as error:
            log.info("could not lower the DIL thread's priority (%s)", error)


def signal_content(signal) -> dict:
    """A signal's candidate as plain notes per target track."""
    return {int(track): [tuple(note) for note in notes] for track, notes in signal.candidate.items()}


class Learner:
    """SignalSink of the daemon: queues signals, learns from them on its thread, serves the engine."""

    def __init__(self, engine, root: Path, settings: DILSettings = DILSettings(),
                 device: Optional[torch.device] = None, seed: Optional[int] = None,
                 step_kinds: tuple[str, ...] = STEP_KINDS):
        """step_kinds: which of STEP_KINDS it takes (the simulated users' ablations take one); a
        signal whose step is not taken is still remembered (first versions, rejected content)."""
        if not set(step_kinds) <= set(STEP_KINDS):
            raise ValueError(f"step kinds {step_kinds}: choose from {STEP_KINDS}")
        self.engine = engine
        self.settings = settings
        self.step_kinds = tuple(step_kinds)
        self.device = device
        self.store = ProfileStore(root, engine.bundle.manifest["files"][JEPA_WEIGHTS])
        self.window_tokens = engine.bundle.tokenizer.context_tokens
        self.initializers = engine.jepa_initializers()
        self.rng = np.random.default_rng(seed)
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
        self.ready = threading.Event()
        """Set once the thread runs (temporaries of an interrupted save removed)."""
        self.models: OrderedDict[str, ProfileModel] = OrderedDict()
        self.first_versions: OrderedDict[str, tuple[str, dict]] = OrderedDict()
        self.last_rejected: OrderedDict[str, dict] = OrderedDict()
        """Session -> the content rejected last: a `reject` then a repeat of the same notes count once."""
        self._base: Optional[JEPA] = None
        self._trainable: set[str] = set()
        engine.saved_profile_weights = self.saved_graph_weights
        self._thread = threading.Thread(target=self._run, name="cmi-dil", daemon=True)
        self._thread.start()

    # ----- SignalSink (socket loop) -----

    def on_signal(self, signal) -> None:
        self._enqueue(("signal", signal))

    def reset_profile(self, profile: str) -> None:
        self._enqueue(("reset", profile))

    def _enqueue(self, item) -> None:
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            log.warning("DIL queue full: dropping a %s", item[0])

    def wait_idle(self, timeout_s: float = 60.0) -> bool:
        """True once every queued item has been handled (tests and benchmarks)."""
        deadline_s = time.monotonic() + timeout_s
        while time.monotonic() < deadline_s:
            if self.ready.is_set() and self.queue.unfinished_tasks == 0:
                return True
            time.sleep(0.02)
        return False

    def close(self, timeout_s: float = 10.0) -> None:
        """Finish the item in hand and stop (queued signals are dropped: they are in no log yet)."""
        while True:
            try:
                self.queue.get_nowait()
                self.queue.task_done()
            except queue.Empty:
                break
        self.queue.put(None)
        self._thread.join(timeout=timeout_s)

    # ----- the thread -----

    def _run(self) -> None:
        lower_thread_priority()
        torch.set_num_threads(1)
        self.device = self.device or choose_device()
        flush_denormals_in_this_thread(self.device)
        try:
            self.store.remove_temporaries()
        except OSError:
            log.exception("DIL: removing the temporaries of an interrupted save failed")
        self.ready.set()
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                kind, value = item
                if kind == "reset":
                    self._reset(value)
                else:
                    self._learn(value)
            except Exception:  # a learner fault must never reach the daemon
                log.exception("DIL: handling a %s failed", item[0] if item else "stop")
            finally:
                self.queue.task_done()

    def saved_graph_weights(self, profile: str) -> Optional[dict]:
        """The profile's saved adapted weights as the engine's graphs take them, or None (called on
        the engine's thread)."""
        return saved_graph_weights(self.store, profile, self.initializers)

    def _base_jepa(self) -> JEPA:
        if self._base is None:
            self._base = load_torch_jepa(self.engine.bundle)
            self.initializers = served_initializers(self._base, self.initializers)
            self._trainable = trainable_keys(self._base, self.initializers)
        return self._base

    def _model(self, profile: str) -> ProfileModel:
        model = self.models.get(profile)
        if model is None:
            model = ProfileModel(self._base_jepa(), self.settings, self.device, self._trainable)
            saved = self.store.load(profile)
            if saved is not None:
                model.load_tensors(saved.tensors, saved.steps, saved.signals)
            self.models[profile] = model
            while len(self.models) > PROFILES_IN_MEMORY:
                self.models.popitem(last=False)
        self.models.move_to_end(profile)
        return model

    def _install(self, profile: str, model: ProfileModel) -> None:
        self.engine.install_profile_weights(profile, model.graph_weights(self.initializers))

    def _reset(self, profile: str) -> None:
        self.models.pop(profile, None)
        self.store.reset(profile)
        self.engine.install_profile_weights(profile, None)
        for session in [s for s, (p, _) in self.first_versions.items() if p == profile]:
            del self.first_versions[session]
            self.last_rejected.pop(session, None)
        log.info("DIL: profile %s reset to the base model", profile)

    def _piece(self, request, content: dict) -> JEPASequence:
        song = self.engine.bundle.tokenizer.model_song(
            replace_notes_in_range(request.song, request.start_qn, request.end_qn, content))
        return piece(song, request.start_qn, request.end_qn, request.target_tracks, self.window_tokens)

    def _iteration_steps(self, signal, content: dict, model: ProfileModel) -> tuple[str, list[dict]]:
        """Eq. 2 steps for rejected content (once per content and session: a `reject` then a repeat
        of the same notes is one signal)."""
        if self.last_rejected.get(signal.session) == content:
            return "none (rejected already)", []
        self._remember_first(signal, content)
        self.last_rejected[signal.session] = content
        while len(self.last_rejected) > SESSION_MEMORY:
            self.last_rejected.popitem(last=False)
        rejected = self._piece(signal.request, content)
        span = neutral_span(rejected, self.rng)
        if span is None or rejected.blank_end == rejected.blank_start:
            return "none (no context or empty range)", []
        if "iteration" not in self.step_kinds:
            return "none (iteration-wise steps are off)", []
        return "iteration", self._steps(lambda: model.iteration_step(rejected, span))

    def _sample_steps(self, signal, content: dict, model: ProfileModel) -> tuple[str, list[dict]]:
        """Eq. 3 steps for accepted content against the session's first version."""
        first = self.first_versions.pop(signal.session, (signal.profile, None))[1]
        self.last_rejected.pop(signal.session, None)
        if first is None or first == content:
            return "none (the first version was accepted)", []
        if "sample" not in self.step_kinds:
            return "none (sample-wise steps are off)", []
        accepted = self._piece(signal.request, content)
        first_piece = self._piece(signal.request, first)
        return "sample", self._steps(lambda: model.sample_step(accepted, first_piece))

    def _steps(self, step: Callable[[], dict]) -> list[dict]:
        """The signal's gradient steps, each started only while no infill runs."""
        terms = []
        for _ in range(self.settings.steps_per_signal):
            self.engine.idle.wait()
            terms.append(step())
        return terms

    def _remember_first(self, signal, content: dict) -> None:
        if signal.session not in self.first_versions:
            self.first_versions[signal.session] = (signal.profile, content)
            while len(self.first_versions) > SESSION_MEMORY:
                self.first_versions.popitem(last=False)

    def _learn(self, signal) -> None:
        started_s = time.perf_counter()
        profile = signal.profile
        content = signal_content(signal)
        model = self._model(profile)
        if signal.kind in ("repeat", "reject"):
            strategy, terms = self._iteration_steps(signal, content, model)
        else:
            strategy, terms = self._sample_steps(signal, content, model)
        model.signals += 1
        stepped = sum(1 for t in terms if t["stepped"])
        self.engine.idle.wait()
        self.store.save(profile, model.tensors(), model.steps, model.signals, self.settings.to_json())
        if stepped:
            self.engine.idle.wait()
            self._install(profile, model)
        self.store.append_log(profile, {
            "time_s": signal.time_s, "signal": signal.kind, "session": signal.session, "strategy": strategy,
            "steps": stepped, "losses": [round(t["loss"], 6) for t in terms],
            "pos": [round(t["pos"], 6) for t in terms], "neg": [round(t["neg"], 6) for t in terms],
            "learn_ms": round(1000 * (time.perf_counter() - started_s), 1)})
        if strategy in ("iteration", "sample"):
            outcome = f"{stepped} {strategy}-wise step{'' if stepped == 1 else 's'}"
        else:  # "none (why)"
            outcome = f"no step, {strategy.removeprefix('none (').removesuffix(')')}"
        log.info("DIL: %s on profile %s: %s", signal.kind, profile, outcome)
