"""Experiment tracking: the recipe's ``report_to``, resolved once, and the offline-first environment for it.

The logging itself is the Trainer's (its TensorBoard, Weights & Biases and MLflow callbacks); this module
only decides which of them run and where they write:

- ``tensorboard``: event files in ``<output_dir>/runs`` (or the recipe's ``log_dir``);
- ``wandb``: offline unless the user set ``WANDB_MODE``, has an API key and the server answers; the run
  folder goes inside the output dir (``<output_dir>/wandb/offline-run-*``; ``wandb sync`` uploads it later);
- ``mlflow``: a local SQLite store inside the output dir (``sqlite:///<output_dir>/mlflow.db``; recent mlflow
  refuses the plain file store) unless ``MLFLOW_TRACKING_URI`` is set.

The project sends nothing anywhere itself, and turns off what the trackers would send on their own
(mlflow's usage telemetry, wandb's error reports). A variable the user set is never overwritten.
"""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from oasst_peft.errors import OasstError, did_you_mean, shown

TRACKERS = ("tensorboard", "wandb", "mlflow")
CHOICES = (*TRACKERS, "none")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
WANDB_HOST = "https://api.wandb.ai"
PROBE_TIMEOUT_S = 2.0
# What the trackers would send home on their own (mlflow's telemetry, wandb's error reports) is off, and
# wandb's console chatter quiet (train prints where the run went); unless the user set these.
TRACKER_DEFAULTS = {
    "mlflow": {"MLFLOW_DISABLE_TELEMETRY": "true"},
    "wandb": {"WANDB_ERROR_REPORTING": "false", "WANDB_SILENT": "true"},
}

# Values this module put into os.environ, so that a second run in the same process can tell them from
# the user's own (and point them at its own output dir).
_ours: dict[str, str] = {}


def check_report_to(value) -> list[str] | None:
    """The recipe's ``report_to`` as a list of tracker names (a single name is a list of one), or None."""
    if value is None:
        return None
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names:
        raise ValueError("a list of tensorboard, wandb, mlflow or none, e.g. [tensorboard, wandb]")
    out: list[str] = []
    for name in names:
        if not isinstance(name, str) or name not in CHOICES:
            raise ValueError(
                f"unknown tracker '{shown(name)}'; choose from {', '.join(CHOICES)}"
                + did_you_mean(str(name), CHOICES)
            )
        if name not in out:
            out.append(name)
    if "none" in out and len(out) > 1:
        raise ValueError("'none' cannot be combined with a tracker; list the trackers or just none")
    return out


def installed(tracker: str) -> bool:
    return importlib.util.find_spec(PACKAGES[tracker]) is not None


def report_to(recipe) -> list[str]:
    """The trackers this run logs to: the recipe's list, or tensorboard when it is installed, else none."""
    chosen = getattr(recipe, "report_to", None)
    if chosen is None:
        return ["tensorboard"] if installed("tensorboard") else ["none"]
    return [t for t in chosen if t != "none"] or ["none"]


def missing_lines(trackers: list[str]) -> list[str]:
    """One line per chosen tracker whose package is not installed here."""
    return [
        f"report_to: {t} is not installed; pip install 'oasst-peft[{EXTRAS[t]}]' or remove {t} from report_to"
        for t in trackers
        if t in PACKAGES and not installed(t)
    ]


def _user_set(key: str) -> bool:
    return key in os.environ and os.environ[key] != _ours.get(key)


def _set(key: str, value: str) -> None:
    """Set ``key`` unless the user already did."""
    if not _user_set(key):
        os.environ[key] = value
        _ours[key] = value


TENSORBOARD_DIR = "TENSORBOARD_LOGGING_DIR"  # what transformers' TensorBoard callback reads


def _tensorboard_dir(recipe, out: Path) -> str:
    """Where the event files go: the recipe's ``log_dir``, else the user's TENSORBOARD_LOGGING_DIR, else
    ``<out>/runs`` (transformers adds a timestamped folder under it). A ``log_dir`` an earlier run in this
    process set is taken back, so it does not leak into a run whose recipe has none."""
    log_dir = getattr(recipe, "log_dir", None)
    if log_dir:
        os.environ[TENSORBOARD_DIR] = _ours[TENSORBOARD_DIR] = str(Path(log_dir).expanduser().resolve())
        return os.environ[TENSORBOARD_DIR]
    if _user_set(TENSORBOARD_DIR):
        return os.environ[TENSORBOARD_DIR]
    if _ours.pop(TENSORBOARD_DIR, None) is not None:
        os.environ.pop(TENSORBOARD_DIR, None)
    return str(out / "runs")


def _mlflow_experiment(uri: str, name: str, artifacts: Path) -> None:
    """The run's experiment in its own store, with its artifacts beside it: mlflow's default experiment
    would put them in ``./mlruns`` of whatever folder train was started from."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=artifacts.resolve().as_uri())


def _has_wandb_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(urlparse(host).hostname or "")
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to ``url``'s host opens within ``timeout`` seconds."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode() -> tuple[str, str]:
    """(mode, why): the user's ``WANDB_MODE``, else online only with an API key and a server that answers."""
    if _user_set("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE is set"
    host = os.environ.get("WANDB_BASE_URL", WANDB_HOST)
    if not _has_wandb_key(host):
        return "offline", "no API key (wandb login, or WANDB_API_KEY)"
    if not reachable(host):
        return "offline", f"{urlparse(host).hostname} cannot be reached"
    return "online", "API key found and the server answers"


def prepare(recipe, out: Path, say=print, dry_run: bool = False) -> list[str]:
    """Check the chosen trackers are installed and point them at ``out``, offline first. Returns the list.

    A tracker that is not installed is an ``OasstError`` (said instead in a dry run). The environment is
    left alone in a dry run.
    """
    trackers = report_to(recipe)
    for line in missing_lines(trackers):
        if not dry_run:
            raise OasstError(line)
        say(f"tracking: unavailable here: {line}")
    if dry_run:
        absent = {t for t in trackers if t in PACKAGES and not installed(t)}
        say("tracking: " + ", ".join(f"{t} (not installed here)" if t in absent else t for t in trackers))
        return trackers
    out = Path(out).resolve()
    for tracker in trackers:
        for key, value in TRACKER_DEFAULTS.get(tracker, {}).items():
            _set(key, value)
    lines = []
    if "tensorboard" in trackers:
        lines.append(f"tensorboard in {_tensorboard_dir(recipe, out)}")
    if "wandb" in trackers:
        _set("WANDB_DIR", str(out))
        _set("WANDB_PROJECT", "oasst-peft")
        mode, why = wandb_mode()
        _set("WANDB_MODE", mode)
        where = f" in {os.environ['WANDB_DIR']}/wandb" if mode == "offline" else ""
        lines.append(f"wandb {mode}{where} ({why})")
    if "mlflow" in trackers:
        _set("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
        uri = os.environ["MLFLOW_TRACKING_URI"]
        if "mlflow" in sys.modules:  # mlflow keeps the first URI it was given for the whole process
            sys.modules["mlflow"].set_tracking_uri(uri)
        if not _user_set("MLFLOW_TRACKING_URI"):
            _set("MLFLOW_EXPERIMENT_NAME", "oasst-peft")
            out.mkdir(parents=True, exist_ok=True)
            _mlflow_experiment(uri, os.environ["MLFLOW_EXPERIMENT_NAME"], out / "mlartifacts")
        lines.append(f"mlflow in {uri}")
    if "wandb" in trackers or "mlflow" in trackers:
        out.mkdir(parents=True, exist_ok=True)  # wandb's dir and the SQLite file must have a folder
    say("tracking: " + ("; ".join(lines) if lines else "none"))
    return trackers


def end_runs_callback():
    """A TrainerCallback that closes the wandb run at the end of training, so its files are complete
    when ``train`` returns (the Trainer's own callback leaves it open until the process exits)."""
    from transformers import TrainerCallback

    class EndTrackerRuns(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            wandb = sys.modules.get("wandb")
            if wandb is not None and getattr(wandb, "run", None) is not None:
                wandb.finish()

    return EndTrackerRuns()


def flat_params(data: dict, prefix: str = "recipe.", limit: int = 500) -> dict[str, str]:
    """A nested recipe mapping as ``recipe.peft.r``-style names and short string values, for a tracker."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}.", limit))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text if len(text) <= limit else text[: limit - 3] + "..."
    return out


def recipe_params_callback(recipe):
    """A TrainerCallback that logs the whole recipe (``recipe.peft.r``, ``recipe.datasets`` ...) as the run's
    parameters: the Trainer's own callbacks log its arguments and the model config, but not the adapter's
    rank and alpha, the mode or the data mix, which is what runs are compared by."""
    from transformers import TrainerCallback

    params = flat_params(recipe.to_dict())

    class RecipeParams(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            try:
                mlflow = sys.modules.get("mlflow")
                if mlflow is not None and mlflow.active_run() is not None:
                    items = list(params.items())
                    for i in range(0, len(items), 100):  # mlflow takes at most 100 parameters per call
                        mlflow.log_params(dict(items[i : i + 100]))
                wandb = sys.modules.get("wandb")
                if wandb is not None and getattr(wandb, "run", None) is not None:
                    wandb.config.update(params, allow_val_change=True)
            except Exception as e:  # noqa: BLE001 - a tracker's refusal must not stop the run
                print(
                    f"tracking: the recipe was not logged as parameters ({type(e).__name__}: {e})",
                    file=sys.stderr,
                )

    return RecipeParams()
