"""training_curves.png and ``oasst-peft report``: series from a trainer state, the picture, a real tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from oasst_peft import curves
from oasst_peft.cli import app
from oasst_peft.config import recipe_from_dict
from tests.tiny_run import recipe_dict, write_base, write_conversations


def _history() -> list[dict]:
    """Two sessions (a resume after step 2), two eval sets at step 2, the Trainer's end-of-run entry."""
    return [
        {"step": 1, "loss": 3.0, "learning_rate": 1e-3, "num_input_tokens_seen": 100, "train_runtime": 2.0,
         "train_tokens_per_second": 50.0},
        {"step": 2, "loss": 2.5, "learning_rate": 8e-4, "num_input_tokens_seen": 300, "train_runtime": 4.0,
         "train_tokens_per_second": 75.0},
        {"step": 2, "eval_chat_loss": 2.6, "eval_chat_runtime": 1.0, "num_input_tokens_seen": 300},
        {"step": 2, "eval_oasst_export_loss": 2.9, "eval_oasst_export_runtime": 1.0},
        # evaluation (2 s) lies between the logs of step 2 and 3
        {"step": 3, "loss": 2.0, "learning_rate": 6e-4, "num_input_tokens_seen": 500, "train_runtime": 8.0,
         "train_tokens_per_second": 62.5},
        # resumed from checkpoint-3: the Trainer's runtime starts again
        {"step": 4, "loss": 1.8, "learning_rate": 4e-4, "num_input_tokens_seen": 700, "train_runtime": 1.0,
         "train_tokens_per_second": 200.0},
        {"step": 4, "eval_chat_loss": 2.7, "eval_chat_runtime": 0.5, "eval_oasst_export_loss": 2.4},
        {"step": 4, "train_runtime": 1.5, "train_loss": 2.3, "num_input_tokens_seen": 700},
    ]  # fmt: skip


def test_extract_reads_every_series_and_leaves_eval_time_out():
    c = curves.extract(_history())
    assert c.train_loss == [(1, 3.0), (2, 2.5), (3, 2.0), (4, 1.8)]
    assert c.eval_loss == {"chat": [(2, 2.6), (4, 2.7)], "oasst_export": [(2, 2.9), (4, 2.4)]}
    assert [lr for _, lr in c.learning_rate] == [1e-3, 8e-4, 6e-4, 4e-4]
    # step 1: the session average; step 2: 200 tokens in 2 s; step 3: 200 tokens in 4 s less 2 s of eval;
    # step 4 opens the resumed session: its own average.
    assert c.tokens_per_second == [(1, 50.0), (2, 100.0), (3, 100.0), (4, 200.0)]
    assert c.tokens == 700
    assert c.wall_s == pytest.approx(8.0 + 1.5)
    assert c.last_step == 4
    assert c.mean_rate == pytest.approx((100 + 200 + 200 + 200) / (2 + 2 + 2 + 1))


def test_summary_names_best_eval_per_dataset_and_its_step():
    lines = curves.summary_lines(curves.extract(_history()))
    assert "eval loss [chat]: best 2.6000 at step 2 (last 2.7000)" in lines
    assert "eval loss [oasst_export]: best 2.4000 at step 4 (last 2.4000)" in lines
    assert "tokens trained: 700 (non-padding)" in lines
    assert "wall time: 10s training" in lines
    stopped_early = [e for e in _history() if not any(k.startswith("eval_") for k in e)][:2]
    assert curves.summary_lines(curves.extract(stopped_early))[2].startswith(
        "eval loss: none logged by step 2 (the first comes at step eval_steps"
    )


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
        return im.size


@pytest.mark.parametrize(
    "history",
    [_history(), _history()[:1], [e for e in _history() if not any(k.startswith("eval_") for k in e)]],
    ids=["full", "one-step", "no-eval"],
)
def test_draw_writes_a_png_atomically(tmp_path, history):
    png = curves.draw(curves.extract(history), tmp_path / curves.CURVES_FILE, title="run")
    assert png == tmp_path / curves.CURVES_FILE
    assert _png_size(png) == (1200, 800)
    assert sorted(p.name for p in tmp_path.iterdir()) == [curves.CURVES_FILE]  # no temp file left behind


def _write_state(folder: Path, history: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / curves.STATE_FILE).write_text(json.dumps({"log_history": history}), encoding="utf-8")


def test_report_redraws_from_the_run_or_its_newest_checkpoint(tmp_path):
    run = tmp_path / "run"
    _write_state(run / "checkpoint-2", _history()[:2])
    _write_state(run / "checkpoint-3", _history()[:5])
    (run / "checkpoint-4").mkdir()
    (run / "checkpoint-4" / curves.STATE_FILE).write_text('{"log_hi')  # torn by a kill: passed over
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "steps: 3" in result.output and "eval loss [chat]: best 2.6000 at step 2" in result.output
    assert _png_size(run / curves.CURVES_FILE) == (1200, 800)
    _write_state(run, _history())  # the run dir's own state wins over the checkpoints'
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "elsewhere.png")])
    assert "steps: 4" in result.output and (tmp_path / "elsewhere.png").is_file()


def test_report_on_a_folder_without_a_run_is_one_line(tmp_path):
    from oasst_peft.cli import main

    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path)])
    assert e.value.code == 1
    _write_state(tmp_path, [])
    lines = curves.report(tmp_path).lines
    assert lines[-1].startswith("curves: not drawn: nothing logged yet")


def test_a_real_run_draws_its_curves_and_counts_non_padding_tokens(tmp_path):
    from oasst_peft.model import load_tokenizer
    from oasst_peft.train import prepare_data, train

    base = write_base(tmp_path / "base")
    a = write_conversations(tmp_path / "a.jsonl", n=14)
    b = write_conversations(tmp_path / "b.jsonl", n=10)
    d = recipe_dict(base, a, tmp_path / "run", tmp_path / "cache", eval_steps=2, num_train_epochs=1)
    d["datasets"] = [
        {"first": {"data_files": str(a), "format": "messages", "val_split": 0.2}},
        {"second": {"data_files": str(b), "format": "messages", "val_split": 0.2}},
    ]
    recipe = recipe_from_dict(d)
    said: list[str] = []
    res = train(recipe, say=said.append)
    out = res.output_dir
    assert said[-1].startswith(f"done: adapter saved in {out}; curves: {out / curves.CURVES_FILE}")
    assert _png_size(out / curves.CURVES_FILE) == (1200, 800)
    c = curves.load(out)
    assert set(c.eval_loss) == {"first", "second"}
    assert len(c.train_loss) == c.last_step and c.tokens_per_second
    # One epoch: every training conversation once, so the count is the train split's real tokens.
    tokenized, _ = prepare_data(recipe, load_tokenizer(recipe)[0])
    assert c.tokens == sum(len(ids) for ids in tokenized.train["input_ids"])
