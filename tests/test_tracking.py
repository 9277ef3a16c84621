"""report_to: validation, the offline-first environment, and real mlflow / wandb-offline runs read back."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from oasst_peft import tracking
from oasst_peft.config import recipe_from_dict
from oasst_peft.errors import OasstError
from tests.tiny_run import recipe_dict, write_base, write_conversations, write_recipe

ROOT = Path(__file__).resolve().parent.parent
TRACKER_ENV = ("WANDB_", "MLFLOW_", "TENSORBOARD_LOGGING_DIR", "NETRC")


def _recipe(tmp_path: Path, **extra):
    return recipe_dict(tmp_path / "base", tmp_path / "c.jsonl", tmp_path / "run", tmp_path / "cache", **extra)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No tracker variable of the user's, no netrc with a wandb key."""
    for key in list(os.environ):
        if key.startswith(TRACKER_ENV):
            monkeypatch.delenv(key)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setattr(tracking, "_ours", {})
    return monkeypatch


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("wandb", ["wandb"]), (["mlflow", "tensorboard", "mlflow"], ["mlflow", "tensorboard"])],
)
def test_report_to_accepts_a_name_or_a_list(tmp_path, value, expected):
    assert recipe_from_dict(_recipe(tmp_path, report_to=value)).report_to == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("wandbb", "report_to: unknown tracker 'wandbb'; choose from tensorboard, wandb, mlflow, none (did you mean 'wandb'?)"),
        (["none", "wandb"], "report_to: 'none' cannot be combined with a tracker"),
        ([], "report_to: a list of tensorboard, wandb, mlflow or none"),
    ],
)  # fmt: skip
def test_bad_report_to_is_one_line_naming_the_key(tmp_path, value, message):
    with pytest.raises(OasstError) as e:
        recipe_from_dict(_recipe(tmp_path, report_to=value), source="r.yaml")
    assert str(e.value).startswith(f"r.yaml: {message}")
    assert "\n" not in str(e.value)


def test_default_is_tensorboard_when_installed(tmp_path):
    recipe = recipe_from_dict(_recipe(tmp_path))
    assert tracking.report_to(recipe) == (["tensorboard"] if tracking.installed("tensorboard") else ["none"])
    assert tracking.report_to(recipe_from_dict(_recipe(tmp_path, report_to="none"))) == ["none"]


def test_wandb_is_offline_without_a_key_and_honours_wandb_mode(clean_env, tmp_path):
    assert tracking.wandb_mode() == ("offline", "no API key (wandb login, or WANDB_API_KEY)")
    # A key, but a server that does not answer (a closed local port): still offline.
    clean_env.setenv("WANDB_API_KEY", "x" * 40)
    clean_env.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert tracking.wandb_mode()[0] == "offline"
    clean_env.setenv("WANDB_MODE", "disabled")
    assert tracking.wandb_mode() == ("disabled", "WANDB_MODE is set")


def test_prepare_points_trackers_into_each_run_and_keeps_the_users_settings(clean_env, tmp_path):
    recipe = recipe_from_dict(_recipe(tmp_path, report_to=["wandb", "mlflow"]))
    if tracking.missing_lines(["wandb", "mlflow"]):
        with pytest.raises(OasstError, match=r"report_to: \w+ is not installed; pip install 'oasst-peft\["):
            tracking.prepare(recipe, tmp_path / "a", say=lambda _: None)
        return
    said: list[str] = []
    tracking.prepare(recipe, tmp_path / "a", say=said.append)
    a = (tmp_path / "a").resolve()
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{a / 'mlflow.db'}"
    assert os.environ["WANDB_DIR"] == str(a) and os.environ["WANDB_MODE"] == "offline"
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true" and os.environ["WANDB_ERROR_REPORTING"] == "false"
    assert said == [
        f"tracking: wandb offline in {a}/wandb (no API key (wandb login, or WANDB_API_KEY)); mlflow in sqlite:///{a / 'mlflow.db'}"
    ]
    # A second run in the same process writes into its own dir, not the first one's.
    tracking.prepare(recipe, tmp_path / "b", say=lambda _: None)
    assert os.environ["WANDB_DIR"] == str((tmp_path / "b").resolve())
    # What the user set wins.
    clean_env.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/db")
    clean_env.setenv("WANDB_MODE", "online")
    tracking.prepare(recipe, tmp_path / "c", say=lambda _: None)
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////elsewhere/db" and os.environ["WANDB_MODE"] == "online"  # fmt: skip


def _train(tmp_path: Path, report_to: list[str]) -> Path:
    """A real 3-step LoRA run through the CLI in its own process, with no tracker settings of the user's."""
    base = write_base(tmp_path / "base")
    data = write_conversations(tmp_path / "c.jsonl")
    out = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "r.yaml", recipe_dict(base, data, out, tmp_path / "cache", report_to=report_to)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(TRACKER_ENV)}
    env.update(
        PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", NETRC=str(tmp_path / "no-netrc"),
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
        WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
    )  # fmt: skip
    cmd = [sys.executable, "-m", "oasst_peft.cli", "train", str(recipe), "--max-steps", "3"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tracking: " in proc.stdout
    return out


def _losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e["loss"] for e in history if "loss" in e}


@pytest.mark.slow
def test_mlflow_local_store_holds_the_runs_loss(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'oasst-peft[mlflow]')")
    pytest.importorskip("sqlalchemy", reason="mlflow's SQLite store needs sqlalchemy ('oasst-peft[mlflow]')")
    from mlflow.tracking import MlflowClient

    out = _train(tmp_path, ["mlflow"])
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()  # nothing in the cwd
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1
    experiment = client.get_experiment(runs[0].info.experiment_id)
    assert experiment.name == "oasst-peft"  # not mlflow's Default, whose artifacts go to ./mlruns
    assert experiment.artifact_location == (out.resolve() / "mlartifacts").as_uri()
    logged = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "loss")}
    assert logged == pytest.approx(_losses(out)) and len(logged) == 3
    params = runs[0].data.params  # the recipe, so that runs can be compared by rank, alpha, mode and data
    assert params["recipe.peft.r"] == "4" and params["recipe.peft.mode"] == "lora", sorted(params)
    assert params["recipe.model_name"] == str(tmp_path / "base")
    assert json.loads(params["recipe.datasets"])[0]["chat"]["format"] == "messages"


def _wandb_records(path: Path):
    """The protobuf records of a .wandb transaction log (LevelDB-log framing: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb transaction log"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


@pytest.mark.slow
def test_wandb_offline_run_folder_holds_the_history(tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'oasst-peft[wandb]')")
    out = _train(tmp_path, ["wandb"])
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, "the offline run belongs inside the run dir"
    history = {}
    for record in _wandb_records(runs[0]):
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            if "train/loss" in items:
                history[items["train/global_step"]] = items["train/loss"]
    assert history == pytest.approx(_losses(out)) and len(history) == 3


def test_log_dir_of_one_run_does_not_leak_into_the_next(clean_env, tmp_path):
    """Two train() calls in one process: the second recipe has no log_dir, so its events go to its own dir."""
    pytest.importorskip(
        "tensorboard", reason="tensorboard is not installed (pip install 'oasst-peft[tensorboard]')"
    )
    from oasst_peft.train import train

    base = write_base(tmp_path / "base")
    data = write_conversations(tmp_path / "c.jsonl", n=4)
    said: list[str] = []
    common = dict(report_to=["tensorboard"], save_steps=0, max_steps=1)
    first = recipe_dict(
        base, data, tmp_path / "a", tmp_path / "cache", log_dir=str(tmp_path / "tb"), **common
    )
    train(recipe_from_dict(first), say=said.append)
    second = recipe_dict(base, data, tmp_path / "b", tmp_path / "cache", **common)
    train(recipe_from_dict(second), say=said.append)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*")), "the first run's log_dir holds its events"
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1, "the second run wrote there too"
    assert list((tmp_path / "b" / "runs").glob("*/events.out.tfevents.*")), (
        "the second run's events are in b/runs"
    )
    assert f"tracking: tensorboard in {(tmp_path / 'b').resolve() / 'runs'}" in said
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ
    # A TENSORBOARD_LOGGING_DIR of the user's own is kept when the recipe names none.
    clean_env.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "mine"))
    third = recipe_dict(base, data, tmp_path / "c", tmp_path / "cache", **common)
    train(recipe_from_dict(third), say=said.append)
    assert list((tmp_path / "mine").glob("events.out.tfevents.*"))


def test_dry_run_names_a_tracker_that_is_not_installed_once_and_plainly(clean_env, tmp_path, monkeypatch):
    recipe = recipe_from_dict(_recipe(tmp_path, report_to=["tensorboard", "wandb"]))
    monkeypatch.setattr(tracking, "installed", lambda t: t != "wandb")
    said: list[str] = []
    tracking.prepare(recipe, tmp_path / "a", say=said.append, dry_run=True)
    assert said == [
        "tracking: unavailable here: report_to: wandb is not installed; pip install 'oasst-peft[wandb]' or remove "
        "wandb from report_to",
        "tracking: tensorboard, wandb (not installed here)",
    ]


def test_flat_params_name_nested_keys_and_keep_values_short():
    from oasst_peft.tracking import flat_params

    got = flat_params(
        {"peft": {"r": 16, "alpha": 32.0}, "datasets": [{"alpaca": {}}], "x": None, "s": "y" * 900}
    )
    assert got["recipe.peft.r"] == "16" and got["recipe.peft.alpha"] == "32.0"
    assert got["recipe.datasets"] == '[{"alpaca": {}}]' and got["recipe.x"] == "null"
    assert len(got["recipe.s"]) == 500 and got["recipe.s"].endswith("...")


def test_every_tracker_names_an_extra_that_installs_it():
    import tomllib

    from oasst_peft.tracking import EXTRAS, PACKAGES

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for tracker, extra in EXTRAS.items():
        assert any(dep.split(">")[0].split("=")[0].strip() in (PACKAGES[tracker], f"{PACKAGES[tracker]}-skinny")
                   for dep in extras[extra]), (tracker, extra)  # fmt: skip
