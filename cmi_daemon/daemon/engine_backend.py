"""The adapter that plugs the inference engine (cmi_daemon.inference.engine) into the server's InfillBackend,
and the DIL learner (cmi_daemon.dil) into its SignalSink when given a folder for the profiles."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional

from .. import paths
from ..dil.settings import DILSettings
from ..inference.device import dil_device, onnx_device, onnx_device_problem, onnx_providers
from ..inference.engine import Engine, InfillOptions
from ..inference.sampling import SamplingOptions
from . import schema
from .schema import InfillRequest
from .server import BackendResult, StageProgressCallback
from .settings import Settings

log = logging.getLogger("cmi_daemon.daemon.engine_backend")


def load_engine(model_dir: Path, device: str = "auto", warn: Callable[[str], None] = log.warning) -> Engine:
    """The engine on the requested device, or on the CPU with one warning (given to warn) when that
    device cannot be used; its providers say what it really runs on."""
    engine = Engine(model_dir, providers=onnx_providers(device))
    problem = onnx_device_problem(device, engine.providers)
    if problem is not None:
        warn(problem)
    return engine


def engine_options(options: schema.InfillRequestOptions) -> InfillOptions:
    """Validated request options -> the engine's, each option left out taking the engine's default."""
    defaults = SamplingOptions()
    sampling = SamplingOptions(
        temperature=defaults.temperature if options.temperature is None else options.temperature,
        top_p=defaults.top_p if options.top_p is None else options.top_p,
        top_k=defaults.top_k if options.top_k is None else options.top_k,
        repetition_penalty=(defaults.repetition_penalty if options.repetition_penalty is None
                            else options.repetition_penalty))
    return InfillOptions(n_candidates=options.candidates, seed=options.seed, sampling=sampling,
                         controls=dict(options.controls),
                         follow_repeat=InfillOptions.follow_repeat if options.follow_repeat is None
                         else options.follow_repeat)


class EngineBackend:
    """Runs validated requests through one Engine; engine errors keep their meaning on the wire."""

    def __init__(self, model_dir: Path, device: str = "auto", dil_dir: Optional[Path] = None,
                 dil_settings: DILSettings = DILSettings()):
        self.engine = load_engine(model_dir, device)
        self.model_dir = Path(model_dir)
        self.signal_sink = None
        """The DIL learner (the server's SignalSink) when dil_dir is given, DIL is enabled and the model
        is conditioned."""
        self.dil_device: Optional[str] = None
        if dil_dir is not None and dil_settings.enabled and self.engine.bundle.conditioned:
            from ..dil.learner import Learner
            torch_device, problem = dil_device(device)
            if problem is not None:
                log.warning(problem)
            self.dil_device = str(torch_device)
            self.signal_sink = Learner(self.engine, Path(dil_dir), dil_settings, device=torch_device)

    def describe(self) -> dict:
        bundle = self.engine.bundle
        generator = bundle.model_config.generator
        return {
            "name": self.model_dir.name,
            "path": str(self.model_dir),
            "device": onnx_device(self.engine.providers),
            "providers": list(self.engine.providers),
            "dil_device": self.dil_device,
            "conditioned": bool(bundle.conditioned),
            "context_tokens": int(bundle.tokenizer.context_tokens),
            "layers": int(generator.n_layer),
            "width": int(generator.n_embd),
            "created": str(bundle.manifest.get("created", "")),
        }

    def infill(self, request: InfillRequest, progress: StageProgressCallback,
               should_stop: Callable[[], bool]) -> BackendResult:
        started_s = time.perf_counter()
        result = self.engine.infill(request.song, request.start_qn, request.end_qn, request.target_tracks,
                                    engine_options(request.options), cancel=should_stop,
                                    progress=lambda fraction: progress(fraction, "decode"),
                                    profile=request.options.profile)
        timings_ms = dict(result.timings_ms)
        timings_ms["infill"] = round((time.perf_counter() - started_s) * 1000.0, 3)
        return BackendResult([candidate.notes for candidate in result.candidates], timings_ms,
                            [candidate.seed for candidate in result.candidates],
                            None if result.repeat is None else result.repeat.as_wire())


def load_engine_backend(model_dir: Path, settings: Settings) -> EngineBackend:
    """The daemon's backend: the engine, learning per profile under the user data folder."""
    return EngineBackend(model_dir, settings.device, dil_dir=paths.data_dir() / "dil", dil_settings=settings.dil)
