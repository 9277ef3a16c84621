"""The ``oasst-peft`` command line: a thin typer layer over functions you can call from Python.

Every command turns a user mistake into one line on stderr and exit code 1 (``--debug`` shows the
traceback); usage errors exit 2.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from oasst_peft import cli_inspect
from oasst_peft.cli_options import (
    AdapterOpt,
    Dtype,
    ModelArg,
    RecipeArg,
    SetOpt,
    known_configs,
    recipe_from,
    say,
    template_choice,
)
from oasst_peft.errors import OasstError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Open-Assistant-style SFT (full, LoRA, QLoRA) from one YAML recipe, and exact adapter merges.\n\n"
    "Example: oasst-peft train demo-smollm2",
)


def _version(value: bool) -> None:
    if value:
        from oasst_peft import __version__

        typer.echo(f"oasst-peft {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    pass  # only --version; the top-level help text is the app's own, above


@app.command()
def train(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output_dir: Annotated[
        str | None, typer.Option(help="write the run here instead of the recipe's output_dir")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="stop after N optimizer steps")] = None,
    resume: Annotated[
        str | None, typer.Option(help="continue from the latest checkpoint (bare --resume) or a named one")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run in the output dir")] = False,
    dry_run: Annotated[
        bool, typer.Option(help="validate, load data and print the plan; train nothing")
    ] = False,
    nproc: Annotated[
        int | None, typer.Option(min=1, help="processes (GPUs) per node: relaunch under torchrun")
    ] = None,
    nnodes: Annotated[int, typer.Option(min=1, help="number of nodes")] = 1,
    node_rank: Annotated[int, typer.Option(min=0, help="this node's rank")] = 0,
    master_addr: Annotated[str | None, typer.Option(help="address of node 0")] = None,
    master_port: Annotated[int | None, typer.Option(min=1, max=65535, help="port on node 0")] = None,
    hostfile: Annotated[
        Path | None, typer.Option(help="DeepSpeed hostfile: relaunch under the deepspeed launcher")
    ] = None,
    force: Annotated[
        bool, typer.Option(help="resume even if the recipe, data or tokenizer changed since the checkpoint")
    ] = False,
    shutdown_timeout: Annotated[
        int, typer.Option(min=1, help="seconds the launcher gives workers to save after Ctrl-C (default 900)")
    ] = 900,
) -> None:
    """Train as the recipe says.

    Example: oasst-peft train demo-smollm2 --set max_steps=20
    """
    if resume is not None and overwrite:
        raise typer.BadParameter(
            "--resume continues the run in the output dir, --overwrite replaces it: pass one"
        )
    r = recipe_from(recipe, set_)
    resume_arg: bool | str | None = True if resume == "latest" else resume
    from oasst_peft.launch import WORKER_ENV

    if (
        r.deepspeed_config
        and nproc is None
        and not hostfile
        and nnodes == 1
        and not set(WORKER_ENV) & set(os.environ)
    ):
        say("deepspeed_config: DeepSpeed runs under a launcher; starting one process (--nproc N for more)")
        nproc = 1
    if nproc is not None or hostfile or nnodes > 1:
        from oasst_peft.launch import LaunchOptions, check_options, relaunch

        opts = LaunchOptions(nproc, nnodes, node_rank, master_addr, master_port, hostfile, shutdown_timeout)
        if not dry_run:  # every check that needs no weights, before a worker starts
            from oasst_peft.train import preflight

            check_options(opts)
            preflight(r, output_dir=output_dir, resume=resume_arg, overwrite=overwrite, force=force, say=say)
        code = relaunch(opts, sys.argv[1:], dry_run=dry_run, say=say)
        if not dry_run or code:
            raise typer.Exit(code)  # a dry run goes on to print the plan below
    from oasst_peft.train import train as run_train

    result = run_train(
        r,
        output_dir=output_dir,
        max_steps=max_steps,
        resume=resume_arg,
        dry_run=dry_run,
        overwrite=overwrite,
        force=force,
        say=say,
    )
    if result.interrupted:
        raise typer.Exit(130)


@app.command()
def merge(
    run_or_adapter: Annotated[
        Path, typer.Argument(help="a training run dir, an adapter dir or a ZeRO checkpoint")
    ],
    out: Annotated[Path, typer.Option("--out", help="where to write the merged model")],
    base: Annotated[str | None, typer.Option(help="base model (default: the one the run recorded)")] = None,
    dtype: Annotated[Dtype | None, typer.Option(help="output dtype (default: the base's dtype)")] = None,
    verify: Annotated[
        bool | None, typer.Option("--verify/--no-verify", help="compare logits with base + adapter")
    ] = None,
    qlora_base: Annotated[
        Literal["dequantized-nf4", "exact"],
        typer.Option(help="dequantized-nf4 (what QLoRA training saw) | exact (the original weights)"),
    ] = "dequantized-nf4",
    max_shard_size: Annotated[str, typer.Option(help="largest output shard, e.g. 5GB or 500MB")] = "5GB",
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out")] = False,
) -> None:
    """Fold a LoRA/QLoRA adapter (or consolidate a ZeRO checkpoint) into a plain HF checkpoint.

    Example: oasst-peft merge runs/demo-smollm2 --out runs/demo-smollm2-merged
    """
    from merge_tools import merge as run_merge

    report = run_merge(
        run_or_adapter,
        out,
        base=base,
        dtype=dtype,
        qlora_base=qlora_base,
        verify=verify,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        say=say,
    )
    say(f"merged model: {report.out}. Load it with AutoModelForCausalLM.from_pretrained('{report.out}')")


@app.command()
def export(
    src: Annotated[
        Path, typer.Argument(help="a merged or full model dir, or a LoRA/QLoRA run (merged on the way)")
    ],
    gguf: Annotated[
        Path, typer.Option("--gguf", help="the GGUF file to write (an Ollama Modelfile goes beside it)")
    ],
    type_: Annotated[
        Literal["f32", "f16", "bf16", "q8_0"], typer.Option("--type", help="tensor type")
    ] = "f16",
    modelfile: Annotated[
        bool, typer.Option("--modelfile/--no-modelfile", help="write an Ollama Modelfile")
    ] = True,
    overwrite: Annotated[bool, typer.Option(help="replace an existing GGUF / Modelfile")] = False,
) -> None:
    """Write a GGUF for llama.cpp / Ollama (llama family and Bloom), with the oasst chat format and stops.

    Example: oasst-peft export runs/demo-smollm2 --gguf runs/demo-gguf/demo.gguf --type q8_0
    """
    from oasst_peft.export import export_gguf

    export_gguf(src, gguf, qtype=type_, modelfile=modelfile, overwrite=overwrite, say=say)


@app.command("sample")
def sample_cmd(
    model: ModelArg,
    adapter: AdapterOpt = None,
    prompts: Annotated[
        Path | None,
        typer.Option(help="JSONL of {'messages': [...]} or plain text lines (default: widget prompts)"),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="write the JSON sampling report here")] = None,
    config: Annotated[
        list[str] | None,
        typer.Option(
            "--config", callback=known_configs, help="greedy | typical | nucleus | beam; repeat for several"
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="reply length limit in tokens")] = 128,
    seed: Annotated[int, typer.Option(min=0, help="seed for the sampling configs")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="prompts generated together (left padded)")] = 8,
    dtype: Annotated[Dtype | None, typer.Option(help="default: fp32 on CPU")] = None,
    chat_template: Annotated[
        str | None,
        typer.Option(
            callback=template_choice,
            help="saved (the model's own, default) | oasst (install the Open-Assistant template first)",
        ),
    ] = None,
) -> None:
    """Reply to prompts with the saved chat template; print a table and optionally write a JSON report.

    Example: oasst-peft sample runs/demo-smollm2 --config greedy --config typical --out report.json
    """
    from oasst_peft.sample import check_report_path, format_report, load_prompts, sample, write_report

    if out is not None:
        check_report_path(out)  # before the model loads, so no replies are lost to a bad path
    report = sample(
        model,
        adapter=adapter,
        prompts=load_prompts(prompts) if prompts else None,
        configs=config or ["greedy"],
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        dtype=dtype,
        chat_template=chat_template,
        say=say,
    )
    format_report(report)
    if out is not None:
        say(f"report: {write_report(report, out)}")


@app.command("chat")
def chat_cmd(
    model: ModelArg,
    adapter: AdapterOpt = None,
    system: Annotated[str | None, typer.Option(help="system message for the conversation")] = None,
    config: Annotated[
        Literal["greedy", "typical", "nucleus"], typer.Option("--config", help="sampling")
    ] = "greedy",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="reply length limit in tokens")] = 256,
    transcript: Annotated[
        Path | None, typer.Option(help="keep the conversation here as JSON {'messages': [...]}")
    ] = None,
    dtype: Annotated[Dtype | None, typer.Option(help="default: fp32 on CPU")] = None,
    seed: Annotated[int, typer.Option(min=0, help="seed for the sampling configs")] = 0,
) -> None:
    """Talk to a model, turn by turn, with the saved chat template; /reset, /system TEXT, /exit.

    From a pipe, each input line is one user turn and each reply is printed on its own.
    Example: oasst-peft chat runs/demo-smollm2 --transcript chat.json
    """
    from oasst_peft.chat import chat

    chat(
        model,
        adapter=adapter,
        system=system,
        config=config,
        max_new_tokens=max_new_tokens,
        transcript=transcript,
        dtype=dtype,
        seed=seed,
    )


@app.command("report")
def report_cmd(
    run: Annotated[Path, typer.Argument(help="a training run's output dir", show_default=False)],
    out: Annotated[Path | None, typer.Option("--out", help="write the PNG here instead of RUN")] = None,
) -> None:
    """Redraw RUN/training_curves.png from its trainer state; print best eval loss per dataset, tokens, time.

    Example: oasst-peft report runs/demo-smollm2
    """
    from oasst_peft.curves import report

    for line in report(run, out=out).lines:
        say(line)


# The commands that only look (data, plan, recipes) live in cli_inspect.
app.add_typer(cli_inspect.data_app, name="data")
app.command()(cli_inspect.plan)
app.add_typer(cli_inspect.recipes_app, name="recipes")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line and exit 1."""
    from oasst_peft import quiet

    quiet.install()  # hide the known-harmless library warnings (the list and reasons are in quiet.py)
    # torch imports numpy, whose OpenBLAS starts a pool of threads that spin for a while: on 2 cores they took
    # 0.35 s of a 3.3 s merge (benchmarks/merge.py). No command does linear algebra in numpy; set it to
    # override.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("OASST_PEFT_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    # `--resume` with no value means the latest checkpoint.
    for i, a in enumerate(args):
        if a == "--resume" and (i + 1 == len(args) or args[i + 1].startswith("-")):
            args.insert(i + 1, "latest")
            break
    # Python's last garbage collection at exit walks every object torch and transformers created (0.25 s
    # after `import torch` on this machine) only to free memory the process is giving back anyway. Freezing
    # them out of it is the last exit handler (registered first), after the trackers' own.
    atexit.register(gc.freeze)
    sys.exit(_run(args, debug))


class _CtrlC:
    """Notes a Ctrl-C before it becomes KeyboardInterrupt: typer turns that into a silent exit code 130."""

    def __init__(self):
        self.seen = False

    def __call__(self, signum, frame):
        self.seen = True
        raise KeyboardInterrupt

    def __enter__(self):
        self.previous = None
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (not where Ctrl-C is ignored)
            with contextlib.suppress(ValueError):  # (main() called from a thread other than the main one)
                self.previous = signal.signal(signal.SIGINT, self)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _run(args: list[str], debug: bool) -> int:
    """The command's exit code (errors printed as one line), for ``main``."""
    from typer._click.exceptions import ClickException, NoArgsIsHelpError  # (typer's bundled click)

    from merge_tools.errors import MergeError  # instant: merge_tools imports torch only on use

    try:
        with _CtrlC() as ctrl_c:
            code = app(args, prog_name="oasst-peft", standalone_mode=False)
        if code == 130 and ctrl_c.seen:  # (train's own Ctrl-C handler saves, says so and exits 130 itself)
            typer.echo("interrupted", err=True)
    except NoArgsIsHelpError as e:
        typer.echo(e.format_message())
        return 2
    except ClickException as e:  # a usage error (unknown option, value out of range): one line, exit 2
        where = e.ctx.command_path if getattr(e, "ctx", None) else "oasst-peft"
        one_line = " ".join(e.format_message().split())
        typer.echo(f"error: {where}: {one_line} (see {where} --help)", err=True)
        return e.exit_code
    except (OasstError, MergeError) as e:
        if debug:
            raise
        one_line = " ".join(str(e).splitlines())  # a message that quotes user text never spans lines
        typer.echo(f"error: {one_line}", err=True)
        return 1
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("interrupted", err=True)
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    main()
