"""Simulated users of DIL: the paper's protocol (SS_i eq. 4, IC eq. 5, IUS, RIC) and users whose
taste no model component defines.

    python -m training.simulate_users --model BUNDLE --data ../shared/data/pop909/dev --out DIR \\
        [--tests 20 --pieces 5 --rounds 10] [--first-test 0] [--users paper,grounded,random] [--loss cosine]

One test is one user over `pieces` pieces (a song cut to 8 bars, a 2-bar blank, 8 bars, chosen
as training.eval.blanks chooses them) and up to `rounds` infills per piece; the profile learns
across the pieces of a test and starts from the base model at each test. Every system sees the
same pieces and the same sampling seed per (test, piece, round); systems: `off` (DIL off, the
baseline), `iteration`, `sample`, `both` (which steps the learner takes). The verdicts reach the
daemon's own learner (dil.learner.Learner) as `reject` and `accept` signals, one session per
piece, so its policy decides the steps: a reject makes iteration-wise steps with a neutral span
the learner draws; an accept makes sample-wise steps against the session's first version (none
when the first version is accepted), after which the session starts over.

- paper: the unsatisfied part is the blank; the satisfied (neutral) part a fixed random stretch
  of the same token length in the context before it. f = span means of the base model's target
  encoder (frozen: the measuring stick does not move with the learner). Round 0 is the original
  content; SS_i = (D_0 - D_i) / max(D_0, D_i) with D = |f_neu - f_dis|_2. Every round is played;
  a round with SS_i >= gamma is accepted, others rejected. (The paper's iteration-wise step takes
  the satisfied part as its neutral span; the daemon's protocol cannot carry it, so here, as in
  use, the learner draws the span.)
  IC = first round with SS_i >= gamma (rounds + 1 when none). Per test: IUS = (SS_dil - SS_off)
  / |SS_off| over the mean SS of all rounds, RIC = (IC_dil - IC_off) / IC_off over mean IC.
- grounded: wants a lower register: satisfied when the infill's mean pitch is at least
  `--register-drop` semitones below the original content's; rejects until then, accepts and
  moves on. Reports rounds to satisfaction.
- random: no consistent taste: accepts a round with probability 0.3, at random. Reports the
  infills' context fit (mean of PD/DD/CD overlaps with past and future, training.eval.metrics) with
  and without DIL, to see whether learning from noise makes infills worse.

Results of each (user, system, test) are written to DIR/runs/ as they finish, and a run with the
same arguments skips those already there (resume after a stop; a run with another --loss into
the same DIR reuses the `off` baseline). DIR gets results.json, results.md and PNG plots
(results-distance.* for --loss distance).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from scipy import stats

from cmi_daemon.daemon.schema import InfillRequest, InfillRequestOptions
from cmi_daemon.daemon.server import InteractionSignal
from cmi_daemon.dil.examples import piece
from cmi_daemon.dil.learner import STEP_KINDS, Learner
from cmi_daemon.dil.settings import DILSettings
from cmi_daemon.errors import CMIError
from cmi_daemon.files import write_bytes_atomic
from cmi_daemon.inference.bundle import load_torch_jepa
from cmi_daemon.inference.engine import Engine, InfillOptions
from cmi_daemon.music.annotations import bar_lines_qn
from cmi_daemon.music.regions import JEPASequence, replace_notes_in_range, window_song
from cmi_daemon.music.tokens import Song, read_midi
from training.eval import metrics
from training.eval.baselines import Blank
from training.eval.blanks import (choose_blanks, ground_truth_infill, infill_metrics, song_paths,
                                  target_tracks)

GAMMA = 0.10
STRATEGIES = ("off", "iteration", "sample", "both")
USER_STRATEGIES = {"paper": STRATEGIES, "grounded": ("off", "both"), "random": ("off", "both")}
RANDOM_ACCEPT_PROBABILITY = 0.3
PROFILE = "simulated"
LEARNER_TIMEOUT_S = 600.0
PAPER_TABLE6 = {"Iteration-wise": ("+6.5%", "-24.6%", "+13.2%", "-20.9%"),
                "Sample-wise": ("+12.2%", "-34.0%", "+11.7%", "-35.8%"),
                "Both": ("+20.1%", "-43.7%", "+18.5%", "-44.1%")}


@dataclass(frozen=True)
class Case:
    """One piece of a test: the windowed song, its blank, the target tracks."""

    song_id: str
    song: Song
    blank: Blank
    targets: tuple[int, ...]


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def load_cases(data_dir: Path, test: int, n_pieces: int, seed: int) -> list[Case]:
    """n_pieces cases of distinct songs for one test, drawn reproducibly."""
    rng = np.random.default_rng([seed, test])
    paths = song_paths(data_dir, None)
    cases = []
    for index in rng.permutation(len(paths)):
        path = paths[int(index)]
        try:
            song = read_midi(path)
        except CMIError:
            continue
        targets = target_tracks(song)
        lines, _ = bar_lines_qn(song, path)
        blanks = [b for b in choose_blanks(song, path.stem, lines, targets, 1, rng) if b.width_bars == 2]
        if not blanks:
            continue
        blank = blanks[0]
        cases.append(Case(path.parent.name or path.stem,
                          window_song(song, blank.bar_lines_qn[0], blank.bar_lines_qn[-1]), blank, targets))
        if len(cases) == n_pieces:
            break
    return cases


class Evaluator:
    """The base model's frozen target encoder: span-mean features of pieces."""

    def __init__(self, jepa):
        self.jepa = jepa

    @torch.no_grad()
    def features(self, piece_: JEPASequence, span: tuple[int, int]) -> np.ndarray:
        representations = self.jepa.target_representations(torch.tensor([piece_.token_ids]))[0]
        return representations[span[0]:span[1]].mean(dim=0).numpy()


def satisfaction(d0: float, di: float) -> float:
    """SS_i of eq. 4 from the distances at round 0 and round i."""
    largest = max(d0, di)
    return 0.0 if largest <= 0 else (d0 - di) / largest


class SimulatedSystem:
    """The engine plus, unless strategy is `off`, the daemon's own learner (dil.learner.Learner, its
    profile store in a temporary folder) taking the strategy's steps: the user's verdicts reach it
    as the daemon's `reject` and `accept` signals, one session per piece, so the signal-to-step
    policy measured is the one that ships."""

    def __init__(self, engine: Engine, strategy: str, settings: DILSettings):
        self.engine, self.strategy, self.settings = engine, strategy, settings
        self.learner: Optional[Learner] = None
        self._store_dir: Optional[tempfile.TemporaryDirectory] = None

    def reset(self, seed: int) -> None:
        """A fresh profile (the base model) and a learner whose random draws come from seed."""
        self.close()
        if self.strategy == "off":
            return
        self._store_dir = tempfile.TemporaryDirectory(prefix="cmi-simulated-users-")
        step_kinds = STEP_KINDS if self.strategy == "both" else (self.strategy,)
        self.learner = Learner(self.engine, Path(self._store_dir.name), self.settings, torch.device("cpu"),
                               seed=seed, step_kinds=step_kinds)

    def close(self) -> None:
        self.engine.install_profile_weights(PROFILE, None)
        if self.learner is not None:
            self.learner.close()
            self.learner = None
        if self._store_dir is not None:
            self._store_dir.cleanup()
            self._store_dir = None

    def infill(self, case: Case, seed: int) -> dict:
        result = self.engine.infill(case.song, case.blank.start_qn, case.blank.end_qn, case.targets,
                                    InfillOptions(seed=seed), profile=PROFILE)
        return result.candidates[0].notes

    def reject(self, case: Case, session: str, content: dict) -> None:
        self._signal("reject", case, session, content)

    def accept(self, case: Case, session: str, content: dict) -> None:
        self._signal("accept", case, session, content)

    def _signal(self, kind: str, case: Case, session: str, content: dict) -> None:
        if self.learner is None:
            return
        request = InfillRequest(session, case.song, case.blank.start_qn, case.blank.end_qn, case.targets,
                                InfillRequestOptions(profile=PROFILE))
        self.learner.on_signal(InteractionSignal(kind, PROFILE, session, request, content, time.time()))
        if not self.learner.wait_idle(LEARNER_TIMEOUT_S):
            raise RuntimeError(f"the learner did not finish a {kind} signal in {LEARNER_TIMEOUT_S} s")


def case_piece(case: Case, content: dict, window: int) -> JEPASequence:
    song = replace_notes_in_range(case.song, case.blank.start_qn, case.blank.end_qn, content)
    return piece(song, case.blank.start_qn, case.blank.end_qn, case.targets, window)


def satisfied_span(original: JEPASequence, rng: np.random.Generator, window: int) -> tuple[int, int]:
    """The paper user's satisfied part as (tokens back from the blank start, length): a stretch of the
    original blank's token length inside the last eighth of the window before the blank (the
    prefix keeps at least that much, however long the infill: examples.piece cuts the context
    to a quarter-window at most, half of it each side)."""
    reachable = min(original.blank_start, window // 8)
    length = max(1, min(original.blank_end - original.blank_start, reachable))
    return int(rng.integers(0, reachable - length + 1)), length


def span_before_blank(piece_: JEPASequence, back: tuple[int, int]) -> tuple[int, int]:
    offset, length = back
    end = max(1, piece_.blank_start - offset)
    return max(0, end - length), end


def neutral_blank_distance(evaluator: Evaluator, piece_: JEPASequence, back: tuple[int, int]) -> float:
    """Diff(f_neu, f_dis) of eq. 4: Euclidean distance between the target-encoder features of the
    neutral span and of the blank."""
    return float(np.linalg.norm(evaluator.features(piece_, span_before_blank(piece_, back))
                                - evaluator.features(piece_, (piece_.blank_start, piece_.blank_end))))


def paper_test(system: SimulatedSystem, evaluator: Evaluator, cases: Sequence[Case], test: int, rounds: int,
               window: int, seed: int) -> dict:
    system.reset(seed_of(seed, test, "paper"))
    pieces = []
    for index, case in enumerate(cases):
        session = f"test-{test}-piece-{index}"
        original = case_piece(case, ground_truth_infill(case.song, case.blank, case.targets), window)
        back = satisfied_span(original, np.random.default_rng([seed, test, index, 1]), window)
        d0 = neutral_blank_distance(evaluator, original, back)
        scores = []
        for round_ in range(1, rounds + 1):
            content = system.infill(case, seed_of(seed, test, index, round_))
            di = neutral_blank_distance(evaluator, case_piece(case, content, window), back)
            scores.append(satisfaction(d0, di))
            if scores[-1] >= GAMMA:
                system.accept(case, session, content)
            else:
                system.reject(case, session, content)
        reached = [i + 1 for i, s in enumerate(scores) if s >= GAMMA]
        pieces.append({"song": case.song_id, "ss": scores, "ic": reached[0] if reached else rounds + 1,
                       "satisfied": bool(reached)})
    return {"pieces": pieces, "mean_ss": float(np.mean([s for p in pieces for s in p["ss"]])),
            "mean_ic": float(np.mean([p["ic"] for p in pieces]))}


def mean_pitch(content: dict) -> Optional[float]:
    pitches = [n.pitch for notes in content.values() for n in notes]
    return float(np.mean(pitches)) if pitches else None


def grounded_test(system: SimulatedSystem, cases: Sequence[Case], test: int, rounds: int, seed: int,
                  register_drop: float) -> dict:
    system.reset(seed_of(seed, test, "grounded"))
    pieces = []
    for index, case in enumerate(cases):
        session = f"test-{test}-piece-{index}"
        original = mean_pitch(ground_truth_infill(case.song, case.blank, case.targets)) or 60.0
        goal = original - register_drop
        pitches = []
        satisfied_at = rounds + 1
        for round_ in range(1, rounds + 1):
            content = system.infill(case, seed_of(seed, test, index, round_))
            pitch = mean_pitch(content)
            pitches.append(pitch)
            if pitch is not None and pitch <= goal:
                system.accept(case, session, content)
                satisfied_at = round_
                break
            system.reject(case, session, content)
        pieces.append({"song": case.song_id, "goal_pitch": goal, "mean_pitches": pitches, "rounds": satisfied_at,
                       "satisfied": satisfied_at <= rounds})
    return {"pieces": pieces, "mean_rounds": float(np.mean([p["rounds"] for p in pieces]))}


def context_fit(case: Case, content: dict) -> float:
    values = infill_metrics(case.song, case.blank, case.targets, content,
                            ground_truth_infill(case.song, case.blank, case.targets))
    finite = [values[name] for name in metrics.CONTEXT_METRICS if np.isfinite(values[name])]
    return float(np.mean(finite)) if finite else float("nan")


def random_test(system: SimulatedSystem, cases: Sequence[Case], test: int, rounds: int, seed: int) -> dict:
    system.reset(seed_of(seed, test, "random"))
    rng = np.random.default_rng([seed, test, 3])
    pieces = []
    for index, case in enumerate(cases):
        session = f"test-{test}-piece-{index}"
        fits = []
        for round_ in range(1, rounds + 1):
            content = system.infill(case, seed_of(seed, test, index, round_))
            fits.append(context_fit(case, content))
            if rng.random() < RANDOM_ACCEPT_PROBABILITY:
                system.accept(case, session, content)
                break
            system.reject(case, session, content)
        pieces.append({"song": case.song_id, "context_fit": fits})
    return {"pieces": pieces, "mean_context_fit": float(np.nanmean([f for p in pieces for f in p["context_fit"]]))}


# ---------------------------------------------------------------------------------------------
# Summaries


def relative(proposed: float, base: float) -> float:
    """(proposed - base) / |base|: the paper's IUS and RIC when base > 0, and still "higher is higher"
    when a mean SS is negative (the paper's formula would flip the sign there)."""
    return (proposed - base) / abs(base) if base else float("nan")


PIECE_FIGURES = {"paper": lambda piece_: float(np.mean(piece_["ss"])),
                 "grounded": lambda piece_: float(piece_["rounds"]),
                 "random": lambda piece_: float(np.nanmean(piece_["context_fit"]))}
"""Per user, the figure of one piece that the paired test compares: mean SS, rounds to
satisfaction, mean context fit."""


def paired_p(dil: Sequence[float], off: Sequence[float]) -> Optional[float]:
    """Two-sided Wilcoxon signed-rank p of paired per-piece figures (1 when they never differ)."""
    differences = np.subtract(dil, off)
    differences = differences[np.isfinite(differences)]
    if len(differences) == 0:
        return None
    return 1.0 if np.all(differences == 0) else float(stats.wilcoxon(differences).pvalue)


def summarise(runs: dict) -> dict:
    """Per user and strategy: the per-test figures against `off`, their means, and a paired test
    over pieces (each piece is the same song, blank and sampling seeds under both systems)."""
    summary = {}
    for user, by_system in runs.items():
        off = by_system.get("off", {})
        for strategy, tests in by_system.items():
            if strategy == "off":
                continue
            common = sorted(set(tests) & set(off))
            figure = PIECE_FIGURES[user]
            p_pieces = paired_p([figure(p) for t in common for p in tests[t]["pieces"]],
                                [figure(p) for t in common for p in off[t]["pieces"]])
            if user == "paper":
                ius = [relative(tests[t]["mean_ss"], off[t]["mean_ss"]) for t in common]
                ric = [relative(tests[t]["mean_ic"], off[t]["mean_ic"]) for t in common]
                summary[f"{user}/{strategy}"] = {
                    "tests": len(common), "IUS_per_test": ius, "RIC_per_test": ric,
                    "IUS_mean": float(np.mean(ius)) if ius else None, "RIC_mean": float(np.mean(ric)) if ric else None,
                    "IUS_pooled": relative(float(np.mean([tests[t]["mean_ss"] for t in common])),
                                           float(np.mean([off[t]["mean_ss"] for t in common]))) if common else None,
                    "SS_dil": float(np.mean([tests[t]["mean_ss"] for t in common])) if common else None,
                    "SS_off": float(np.mean([off[t]["mean_ss"] for t in common])) if common else None,
                    "IC_dil": float(np.mean([tests[t]["mean_ic"] for t in common])) if common else None,
                    "IC_off": float(np.mean([off[t]["mean_ic"] for t in common])) if common else None,
                    "p_pieces": p_pieces}
            elif user == "grounded":
                summary[f"{user}/{strategy}"] = {
                    "tests": len(common),
                    "rounds_dil_per_test": [tests[t]["mean_rounds"] for t in common],
                    "rounds_off_per_test": [off[t]["mean_rounds"] for t in common],
                    "satisfied_dil": sum(p["satisfied"] for t in common for p in tests[t]["pieces"]),
                    "satisfied_off": sum(p["satisfied"] for t in common for p in off[t]["pieces"]),
                    "pieces": sum(len(tests[t]["pieces"]) for t in common), "p_pieces": p_pieces}
            else:
                dil = [tests[t]["mean_context_fit"] for t in common]
                base = [off[t]["mean_context_fit"] for t in common]
                summary[f"{user}/{strategy}"] = {
                    "tests": len(common), "fit_dil_per_test": dil, "fit_off_per_test": base,
                    "worst_difference": float(np.min(np.subtract(dil, base))) if common else None,
                    "mean_difference": float(np.mean(np.subtract(dil, base))) if common else None,
                    "p_pieces": p_pieces}
    return summary


def percent(value: Optional[float]) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{100 * value:+.1f}%"


def p_text(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2g}"


def results_markdown(summary: dict, protocol: dict) -> str:
    lines = ["# DIL with simulated users", "",
             f"Model `{protocol['model']}`; {protocol['tests']} tests x {protocol['pieces']} pieces x up to "
             f"{protocol['rounds']} rounds; data `{protocol['data']}`; loss `{protocol['loss']}`, "
             f"{protocol['steps_per_signal']} AdamW steps per signal at lr {protocol['lr']}; seed {protocol['seed']}; "
             f"{protocol['elapsed_s']:.0f} s.", "",
             "## Paper protocol (IUS up is better, RIC down is better)", "",
             "IUS and RIC are means of the per-test ratios (as the paper's Figure 3 averages tests); a test "
             "whose baseline SS is near 0 makes its ratio huge, so the pooled IUS (ratio of the mean SS) is "
             "given too. IC counts rounds + 1 for a piece never satisfied. p: two-sided Wilcoxon signed-rank "
             "test over pieces of each piece's mean SS, DIL against off (here and in the tables below, of "
             "that table's figure).", "",
             "| Strategy | IUS (here) | pooled IUS | RIC (here) | SS DIL / off | p | IC DIL / off | "
             "paper Bread IUS / RIC | paper LMD IUS / RIC |",
             "|---|---|---|---|---|---|---|---|---|"]
    for strategy, label in (("iteration", "Iteration-wise"), ("sample", "Sample-wise"), ("both", "Both")):
        entry = summary.get(f"paper/{strategy}")
        paper = PAPER_TABLE6[label]
        if entry is None:
            continue
        lines.append(f"| {label} | {percent(entry['IUS_mean'])} | {percent(entry['IUS_pooled'])} | "
                     f"{percent(entry['RIC_mean'])} | "
                     f"{entry['SS_dil']:.3f} / {entry['SS_off']:.3f} | {p_text(entry['p_pieces'])} | "
                     f"{entry['IC_dil']:.2f} / {entry['IC_off']:.2f} | "
                     f"{paper[0]} / {paper[1]} | {paper[2]} / {paper[3]} |")
    grounded = summary.get("grounded/both")
    if grounded:
        lines += ["", "## Grounded user (wants a lower register)", "",
                  "| | DIL off | DIL both |", "|---|---|---|",
                  "| mean rounds to satisfaction (censored at rounds + 1) | "
                  f"{np.mean(grounded['rounds_off_per_test']):.2f} | "
                  f"{np.mean(grounded['rounds_dil_per_test']):.2f} |",
                  f"| pieces satisfied | {grounded['satisfied_off']} / {grounded['pieces']} | "
                  f"{grounded['satisfied_dil']} / {grounded['pieces']} |",
                  f"| p (rounds, over pieces) | | {p_text(grounded['p_pieces'])} |"]
    noisy = summary.get("random/both")
    if noisy:
        lines += ["", "## User with random rejections (no consistent taste)", "",
                  "Context fit: mean of the PD/DD/CD overlaps with past and future (higher fits better).", "",
                  "| | DIL off | DIL both |", "|---|---|---|",
                  f"| mean context fit | {np.mean(noisy['fit_off_per_test']):.4f} | "
                  f"{np.mean(noisy['fit_dil_per_test']):.4f} |",
                  f"| worst per-test difference (DIL - off) | | {noisy['worst_difference']:+.4f} |",
                  f"| p (context fit, over pieces) | | {p_text(noisy['p_pieces'])} |"]
    return "\n".join(lines) + "\n"


def plot(summary: dict, out_dir: Path, suffix: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entry = summary.get("paper/both")
    if entry and entry["tests"]:
        figure, axis = plt.subplots(figsize=(8, 3.5))
        index = np.arange(entry["tests"])
        axis.bar(index - 0.2, 100 * np.array(entry["IUS_per_test"]), 0.4, label="IUS", color="tab:blue")
        axis.bar(index + 0.2, 100 * np.array(entry["RIC_per_test"]), 0.4, label="RIC", color="tab:orange")
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_xlabel("test")
        axis.set_ylabel("% vs DIL off")
        axis.set_title("DIL (both strategies) per test")
        axis.legend()
        figure.tight_layout()
        figure.savefig(out_dir / f"ius_ric_per_test{suffix}.png", dpi=120)
        plt.close(figure)
    grounded = summary.get("grounded/both")
    if grounded and grounded["tests"]:
        figure, axis = plt.subplots(figsize=(6, 3.5))
        index = np.arange(grounded["tests"])
        axis.bar(index - 0.2, grounded["rounds_off_per_test"], 0.4, label="DIL off")
        axis.bar(index + 0.2, grounded["rounds_dil_per_test"], 0.4, label="DIL both")
        axis.set_xlabel("test")
        axis.set_ylabel("mean rounds to satisfaction")
        axis.set_title("Grounded user: lower register")
        axis.legend()
        figure.tight_layout()
        figure.savefig(out_dir / f"grounded_rounds{suffix}.png", dpi=120)
        plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tests", type=int, default=20)
    parser.add_argument("--first-test", type=int, default=0,
                        help="run tests first-test..tests-1 only, e.g. to split a run over processes sharing --out; "
                             "a later run from 0 finds their results and summarises all")
    parser.add_argument("--pieces", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--users", default="paper,grounded,random")
    parser.add_argument("--strategies", default=",".join(STRATEGIES[1:]),
                        help="DIL systems to run besides `off` (iteration,sample,both)")
    parser.add_argument("--loss", default="cosine", choices=("cosine", "distance"))
    parser.add_argument("--steps", type=int, default=DILSettings.steps_per_signal)
    parser.add_argument("--lr", type=float, default=DILSettings.lr)
    parser.add_argument("--register-drop", type=float, default=3.0, help="semitones (grounded user)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    started_s = time.perf_counter()
    torch.set_num_threads(1)
    settings = DILSettings(steps_per_signal=args.steps, lr=args.lr, loss=args.loss)
    engine = Engine(args.model)
    base = load_torch_jepa(engine.bundle)
    evaluator = Evaluator(base)
    window = engine.bundle.tokenizer.context_tokens
    runs_dir = args.out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    users = [u for u in args.users.split(",") if u]
    chosen = {"off", *(x for x in args.strategies.split(",") if x)}
    runs: dict = {}
    systems = {strategy: SimulatedSystem(engine, strategy, settings) for strategy in STRATEGIES
               if strategy in chosen}
    for test in range(args.first_test, args.tests):
        cases = load_cases(args.data, test, args.pieces, args.seed)
        for user in users:
            for strategy in (x for x in USER_STRATEGIES[user] if x in chosen):
                system_name = strategy if strategy == "off" else f"{strategy}-{args.loss}"
                path = runs_dir / f"{user}-{system_name}-{test:03d}.json"
                if path.exists():
                    result = json.loads(path.read_text())
                else:
                    system = systems[strategy]
                    if user == "paper":
                        result = paper_test(system, evaluator, cases, test, args.rounds, window, args.seed)
                    elif user == "grounded":
                        result = grounded_test(system, cases, test, args.rounds, args.seed, args.register_drop)
                    else:
                        result = random_test(system, cases, test, args.rounds, args.seed)
                    system.close()
                    write_bytes_atomic(path, json.dumps(result).encode())
                runs.setdefault(user, {}).setdefault(strategy, {})[test] = result
                print(f"test {test} {user}/{strategy}: " + ", ".join(
                    f"{k}={v:.3f}" for k, v in result.items() if isinstance(v, float)), flush=True)
    summary = summarise(runs)
    protocol = {"model": str(args.model), "data": str(args.data), "tests": args.tests, "first_test": args.first_test,
                "pieces": args.pieces, "rounds": args.rounds, "loss": args.loss, "steps_per_signal": args.steps,
                "lr": args.lr, "gamma": GAMMA, "register_drop": args.register_drop, "seed": args.seed,
                "elapsed_s": time.perf_counter() - started_s}
    suffix = "" if args.loss == "cosine" else f"-{args.loss}"
    write_bytes_atomic(args.out / f"results{suffix}.json",
                       json.dumps({"protocol": protocol, "summary": summary}, indent=1).encode())
    write_bytes_atomic(args.out / f"results{suffix}.md", results_markdown(summary, protocol).encode())
    plot(summary, args.out, suffix)
    print(results_markdown(summary, protocol))


if __name__ == "__main__":
    main()
