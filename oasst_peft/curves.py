"""Training curves: ``training_curves.png`` in every run dir, and the short summary ``oasst-peft report`` prints.

Everything comes from the Trainer's ``trainer_state.json`` (its ``log_history``), so a run can be redrawn
at any time, and a run killed before it finished is drawn from its latest checkpoint's copy. Four panels
over optimizer steps: train loss, eval loss per dataset of the mix (the Trainer logs
``eval_<dataset>_loss`` for each validation split), learning rate, and real tokens per second. The
tokens are the Trainer's own count of non-padding input tokens (``num_input_tokens_seen``, which ``train``
turns on); the rate of each logging interval leaves the evaluation time inside it out.

    from oasst_peft.curves import report
    print("\\n".join(report("runs/demo-smollm2").lines))
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from oasst_peft import atomic
from oasst_peft.errors import OasstError

CURVES_FILE = "training_curves.png"
STATE_FILE = "trainer_state.json"
EVAL_LOSS = re.compile(r"^eval_(?:(?P<name>.+)_)?loss$")
EVAL_RUNTIME = re.compile(r"^eval_(?:.+_)?runtime$")
WIDTH_IN, HEIGHT_IN, DPI = 12.0, 8.0, 100  # 1200 x 800 px


@dataclass
class Curves:
    """The series of one run's log history, each a list of (step, value)."""

    train_loss: list = field(default_factory=list)
    eval_loss: dict = field(default_factory=dict)  # dataset name -> [(step, loss)]
    learning_rate: list = field(default_factory=list)
    tokens_per_second: list = field(default_factory=list)
    rate_tokens_s: tuple = (0, 0.0)  # tokens and seconds summed over the rated intervals (eval time out)
    tokens: int | None = None  # non-padding input tokens trained on
    wall_s: float | None = None  # training time over every session of the run (resumes included)
    last_step: int = 0

    @property
    def mean_rate(self) -> float | None:
        """Tokens/s over all rated intervals together (not the mean of their rates)."""
        tokens, seconds = self.rate_tokens_s
        return tokens / seconds if seconds > 0 else None

    @property
    def empty(self) -> bool:
        return not (self.train_loss or self.eval_loss or self.learning_rate)


@dataclass
class Report:
    curves: Curves
    png: Path | None
    lines: list[str]


def extract(log_history: list[dict]) -> Curves:
    """The curves in a Trainer ``log_history``."""
    c = Curves()
    eval_s: dict[int, float] = {}
    sessions: list[float] = []  # longest train_runtime seen in each session
    train_points = []  # (step, tokens, runtime, session-average rate)
    for entry in log_history:
        step = int(entry.get("step", 0))
        c.last_step = max(c.last_step, step)
        if "loss" in entry:
            c.train_loss.append((step, float(entry["loss"])))
        if "learning_rate" in entry:
            c.learning_rate.append((step, float(entry["learning_rate"])))
        for key, value in entry.items():
            m = EVAL_LOSS.match(key)
            if m and not key.endswith("_aux_loss"):
                c.eval_loss.setdefault(m.group("name") or "eval", []).append((step, float(value)))
            elif EVAL_RUNTIME.match(key):
                eval_s[step] = eval_s.get(step, 0.0) + float(value)
        if "num_input_tokens_seen" in entry:
            c.tokens = max(c.tokens or 0, int(entry["num_input_tokens_seen"]))
        runtime = entry.get("train_runtime")
        if runtime is not None:
            runtime = float(runtime)
            if not sessions or runtime < sessions[-1]:
                sessions.append(runtime)  # the runtime restarts: a resumed session
                train_points.append(None)
            sessions[-1] = max(sessions[-1], runtime)
            if "loss" in entry and "num_input_tokens_seen" in entry:
                rate = entry.get("train_tokens_per_second")
                train_points.append((step, int(entry["num_input_tokens_seen"]), runtime, rate))
    c.wall_s = sum(sessions) if sessions else None
    c.tokens_per_second, c.rate_tokens_s = _rates(train_points, eval_s)
    return c


def _rates(points: list, eval_s: dict[int, float]) -> list:
    """Tokens/s per logging interval, and the (tokens, seconds) they add up to.

    ``None`` in ``points`` starts a session, whose first rate is the Trainer's own session average.
    """
    rates, prev, total_tokens, total_s = [], None, 0, 0.0
    for p in points:
        if p is None:
            prev = None
            continue
        step, tokens, runtime, session_rate = p
        if prev is None:
            if session_rate:
                rates.append((step, float(session_rate)))
                total_tokens, total_s = total_tokens + float(session_rate) * runtime, total_s + runtime
        else:
            evals = sum(s for e, s in eval_s.items() if prev[0] <= e < step)
            seconds = runtime - prev[2] - evals
            if seconds > 0 and tokens >= prev[1]:
                rates.append((step, (tokens - prev[1]) / seconds))
                total_tokens, total_s = total_tokens + tokens - prev[1], total_s + seconds
        prev = p
    return rates, (round(total_tokens), total_s)


def _read_history(path: Path) -> list[dict] | None:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    history = state.get("log_history") if isinstance(state, dict) else None
    return [e for e in history if isinstance(e, dict)] if isinstance(history, list) else None


def find_state(run: str | Path) -> tuple[Path, list[dict]]:
    """The run's trainer state and its log history: the run dir's own, else its newest readable checkpoint's.

    A checkpoint torn by a kill mid-write is passed over for the one before it.
    """
    run = Path(run)
    if not run.is_dir():
        raise OasstError(f"{run}: no such run folder (give the output_dir of a training run)")
    candidates = [run / STATE_FILE] if (run / STATE_FILE).is_file() else []
    steps = []
    for ckpt in run.glob("checkpoint-*"):
        tail = ckpt.name.removeprefix("checkpoint-")
        if tail.isdigit() and (ckpt / STATE_FILE).is_file():
            steps.append((int(tail), ckpt / STATE_FILE))
    candidates += [path for _, path in sorted(steps, reverse=True)]
    for path in candidates:
        history = _read_history(path)
        if history is not None:
            return path, history
    if candidates:
        raise OasstError(f"{candidates[0]}: cannot read the trainer state (no readable log_history in it)")
    raise OasstError(
        f"{run}: no {STATE_FILE} here or in a checkpoint-* folder; is this the output_dir of a training run?"
    )


def load(run: str | Path) -> Curves:
    """The curves of a run dir (see ``find_state``)."""
    return extract(find_state(run)[1])


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def summary_lines(c: Curves) -> list[str]:
    """Best eval loss per dataset and its step, the last train loss, tokens trained and wall time."""
    lines = [f"steps: {c.last_step}"]
    if c.train_loss:
        step, loss = c.train_loss[-1]
        lines.append(f"train loss: {loss:.4f} at step {step}")
    if not c.eval_loss:
        lines.append(
            f"eval loss: none logged by step {c.last_step} (the first comes at step eval_steps; none at all "
            "without a validation split or with eval_steps: 0)"
        )
    for name, points in sorted(c.eval_loss.items()):
        step, loss = min(points, key=lambda p: (p[1], p[0]))
        lines.append(f"eval loss [{name}]: best {loss:.4f} at step {step} (last {points[-1][1]:.4f})")
    lines.append(
        f"tokens trained: {c.tokens:,} (non-padding)"
        if c.tokens is not None
        else "tokens trained: not logged"
    )
    if c.mean_rate is not None:
        lines.append(f"tokens/s: {c.mean_rate:,.0f} (non-padding, evaluation time left out)")
    lines.append(
        f"wall time: {_duration(c.wall_s)} training" if c.wall_s is not None else "wall time: not logged"
    )
    return lines


def _panel(ax, title: str, ylabel: str, series: dict, empty_note: str, mean: float | None = None) -> None:
    ax.set_title(title, fontsize=13)
    ax.set_xlabel("optimizer step", fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=10)
    drawn = False
    markers = "osD^v<>ph*"
    for i, (label, points) in enumerate(series.items()):
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(
            xs,
            ys,
            marker=markers[i % len(markers)] if len(xs) <= 200 else None,
            markersize=4 if len(xs) > 30 else 6,
            linewidth=1.8,
            label=label,
        )
        drawn = True
    if not drawn:
        ax.text(
            0.5,
            0.5,
            empty_note,
            ha="center",
            va="center",
            transform=ax.transAxes,
            fontsize=11,
            color="0.4",
            wrap=True,
        )
        ax.set_xticks([])
        ax.set_yticks([])
        return
    from matplotlib.ticker import MaxNLocator

    steps = [x for pts in series.values() for x, _ in pts]
    lo, hi = min(steps), max(steps)
    if hi - lo < 3:  # a step or two: whole-step ticks around them, not fractions of a step
        ax.set_xlim(lo - 1, hi + 1)
        ax.set_xticks(range(lo - 1, hi + 2))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if mean is not None:
        ax.axhline(mean, color="0.35", linestyle="--", linewidth=1.2, label=f"whole run {mean:,.0f}")
    if len(series) > 1 or "" not in series or mean is not None:
        ax.legend(fontsize=10, loc="best")


def draw(c: Curves, path: str | Path, title: str = "") -> Path:
    """Write the four-panel PNG to ``path`` (a temp sibling, then renamed into place)."""
    # The Agg canvas on a bare Figure: no pyplot, so no global figure state and a user's backend is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    (a, b), (d, e) = fig.subplots(2, 2)
    _panel(a, "train loss", "loss (assistant tokens)", {"": c.train_loss}, "no train loss logged yet")
    _panel(
        b,
        "eval loss per dataset",
        "loss (assistant tokens)",
        dict(sorted(c.eval_loss.items())),
        "no evaluation in this run\n(no validation split, or eval_steps: 0)",
    )
    _panel(d, "learning rate", "learning rate", {"": c.learning_rate}, "no learning rate logged")
    _panel(
        e,
        "training throughput",
        "tokens / s (non-padding)",
        {"": c.tokens_per_second},
        "tokens/s needs two logged steps\n(or a run that counts num_input_tokens_seen)",
        mean=c.mean_rate,
    )
    bits = [title] if title else []
    bits.append(f"{c.last_step} step" + ("" if c.last_step == 1 else "s"))
    if c.tokens is not None:
        bits.append(f"{c.tokens:,} tokens")
    if c.wall_s is not None:
        bits.append(_duration(c.wall_s))
    fig.suptitle("  ·  ".join(bits), fontsize=14)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def report(run: str | Path, out: str | Path | None = None) -> Report:
    """Redraw ``RUN/training_curves.png`` (or ``out``) from the run's trainer state; the summary lines."""
    run = Path(run)
    state, history = find_state(run)
    c = extract(history)
    lines = summary_lines(c)
    if c.empty:
        lines.append(f"curves: not drawn: nothing logged yet in {state}")
        return Report(c, None, lines)
    png = draw(c, Path(out) if out else run / CURVES_FILE, title=run.resolve().name)
    lines.append(f"curves: {png}")
    return Report(c, png, lines)


def write_state(state, out: Path) -> Path:
    """Save a Trainer's ``TrainerState`` as ``out/trainer_state.json`` (temp sibling, then renamed)."""
    path = Path(out) / STATE_FILE
    with atomic.replacing(path) as tmp:
        state.save_to_json(str(tmp))
    return path


def named(png: Path | None) -> str:
    """The closing line's mention of the curves: '; curves: PATH', or nothing when none were drawn."""
    return f"; curves: {png}" if png else ""


def finish(trainer, out: str | Path, say=print) -> Path | None:
    """After training or a stop: save the trainer state beside the run and draw its curves (rank 0 only).

    Returns the PNG, or None (said in one line) when nothing was logged or the disk refused the write;
    the run itself is already saved either way.
    """
    if not trainer.is_world_process_zero():
        return None
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_state(trainer.state, out)
        c = extract(trainer.state.log_history)
        if c.empty:
            say(f"curves: not drawn: no step was logged (logging_steps: {trainer.args.logging_steps})")
            return None
        return draw(c, out / CURVES_FILE, title=out.resolve().name)
    except OSError as e:
        say(
            f"curves: not drawn: cannot write in {out} ({e.strerror or e}); redraw later with oasst-peft report {out}"
        )
        return None
