"""The command line: parse, call one recipe per verb, print, exit with a meaningful code.

Exit codes: 0 success; 1 a failure while running; 2 a usage or config error; 130 interrupted.
With --json, stdout carries exactly one JSON object; human output goes to stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
import yaml

import transferctl
from transferctl import check, runs_index
from transferctl.components import load_components
from transferctl.console import ConsoleReporter
from transferctl.errors import TransferError, UsageError, did_you_mean
from transferctl.fileio import finite
from transferctl.registry import REGISTRIES
from transferctl.runs import DEFAULT_RUNS_DIR

if TYPE_CHECKING:
    from transferctl.recipes import RunResult
    from transferctl.recipes.export import ExportResult

# torch and the recipes are imported inside the commands: `--version`, `--help` and usage errors stay instant.

app = typer.Typer(
    name="transferctl",
    help="Pretrain an encoder (self-supervised or supervised), fine-tune it on few labels, evaluate it.",
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _complete_run_ids(ctx: typer.Context, incomplete: str) -> list[str]:
    """Shell completion of run ids: the runs under --runs-dir (if already typed) or ./runs."""
    runs_dir = Path(ctx.params.get("runs_dir") or DEFAULT_RUNS_DIR)
    try:
        return sorted(p.name for p in runs_dir.iterdir() if p.name.startswith(incomplete) and (p / "summary.json").is_file())
    except OSError:
        return []


ConfigOption = typer.Option(None, "--config", "-c", help="YAML config file.", dir_okay=False)
Overrides = typer.Argument(None, help="key=value overrides with dotted keys, e.g. train.epochs=3 optimizer.lr=0.1", show_default=False)
RunsDir = typer.Option(DEFAULT_RUNS_DIR, "--runs-dir", help="Where runs are written and bare run ids are looked up.")
JsonFlag = typer.Option(False, "--json", help="Print one JSON object with run_id, run_dir and metrics on stdout.")
QuietFlag = typer.Option(False, "--quiet", "-q", help="No progress or tables on stderr.")
NprocOption = typer.Option(1, "--nproc", min=1, help="Train with N processes on this machine (wraps torchrun; GPUs: one each).")
FromOption = typer.Option(..., "--from", help="A run directory (runs/<id>) or a bare run id.", autocompletion=_complete_run_ids)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"transferctl {transferctl.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    plugins: list[str] | None = typer.Option(
        None,
        "--plugin",
        metavar="MODULE",
        show_default=False,
        help="Import this module (or .py file) first: its decorators register components. Repeatable.",
    ),
) -> None:
    """transferctl: transfer learning from the command line."""
    from transferctl.distributed import init_from_env
    from transferctl.plugins import load_plugins

    init_from_env()  # under torchrun: join the process group before any work
    load_plugins(plugins or [])  # before the command: its config may name their components


class _Output:
    """Where a command's result goes: JSON on stdout, or a table on stderr and the run dir on stdout."""

    def __init__(self, as_json: bool, quiet: bool):
        from transferctl.distributed import world

        self.main = world().is_main  # under torchrun only rank 0 speaks
        self.as_json = as_json
        self.reporter = ConsoleReporter(quiet=quiet or not self.main)

    def result(self, result: RunResult | ExportResult, title: str) -> None:
        if not self.main:
            return
        if self.as_json:
            typer.echo(json.dumps(finite(result.to_json())))
            return
        if hasattr(result, "export_dir"):
            typer.echo(str(result.export_dir))
            return
        self.reporter.table(title, {"run": str(result.run_dir), "status": result.status, **result.metrics})
        typer.echo(str(result.run_dir))


def _guarded(as_json: bool, job: Callable[[], Any], cleanup: Callable[[], None] = lambda: None) -> Any:
    """`job()`; its errors become one line on stderr (and an error object with --json) and the exit code."""
    try:
        return job()
    except TransferError as exc:
        cleanup()
        _fail(str(exc), exc.exit_code, as_json)
    except KeyboardInterrupt:
        cleanup()
        _fail("interrupted", 130, as_json)
    except BrokenPipeError:  # whoever read stdout stopped (`| head`): stop quietly, as a pipe's writer does
        cleanup()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        raise typer.Exit(141) from None
    except Exception as exc:  # a bug or an environment problem: still one line, exit 1, and JSON for scripts
        cleanup()
        _fail(f"unexpected {type(exc).__name__}: {exc} (please report it with the command that caused it)", 1, as_json)


def _execute(as_json: bool, quiet: bool, title: str, job: Callable[[ConsoleReporter], Any]) -> None:
    """Run one recipe; errors become one line on stderr (and an error object with --json)."""
    out = _Output(as_json, quiet)
    result = _guarded(as_json, lambda: job(out.reporter), out.reporter.finish)
    results = result if isinstance(result, list) else [result]
    if as_json and len(results) > 1:
        typer.echo(json.dumps(finite({**results[-1].to_json(), "runs": [r.to_json() for r in results]})))
        return
    for item in results:
        out.result(item, title)


def _fail(message: str, code: int, as_json: bool) -> None:
    from transferctl.distributed import world

    if world().is_main:  # under torchrun every rank fails alike; one of them says so
        message = " ".join(message.split())  # always one line
        typer.echo(f"error: {message}", err=True)
        if as_json:
            typer.echo(json.dumps({"status": "error", "exit_code": code, "error": message}))
    raise typer.Exit(code)


ResumeOption = typer.Option(None, "--resume", help="Continue this run (runs/<id> or an id) from its last checkpoint, in place.")


@app.command()
def pretrain(
    config: Path | None = ConfigOption,
    overrides: list[str] | None = Overrides,
    resume_run: str | None = ResumeOption,
    runs_dir: Path = RunsDir,
    as_json: bool = JsonFlag,
    quiet: bool = QuietFlag,
    nproc: int = NprocOption,
) -> None:
    """Pretrain an encoder (any method that pretrain runs: `transferctl list methods`) into a new run, or --resume one."""
    _maybe_launch(nproc)
    _execute(as_json, quiet, "pretrain", _training_job("pretrain", None, config, overrides, resume_run, runs_dir))


@app.command()
def finetune(
    source: str | None = typer.Option(
        None,
        "--from",
        help="The pretraining run (runs/<id> or an id); omit to train from scratch with -c.",
        autocompletion=_complete_run_ids,
    ),
    config: Path | None = ConfigOption,
    overrides: list[str] | None = Overrides,
    resume_run: str | None = ResumeOption,
    runs_dir: Path = RunsDir,
    as_json: bool = JsonFlag,
    quiet: bool = QuietFlag,
    nproc: int = NprocOption,
) -> None:
    """Fine-tune a pretrained encoder with a new task head (default: a classifier, 10 labels per class), or --resume one."""
    _maybe_launch(nproc)
    _execute(as_json, quiet, "finetune", _training_job("finetune", source, config, overrides, resume_run, runs_dir))


def _training_job(
    command: str, source: str | None, config: Path | None, overrides: list[str] | None, resume_run: str | None, runs_dir: Path
) -> Callable[[ConsoleReporter], RunResult]:
    """The recipe a pretrain or finetune command line asks for: a new run, or --resume of one."""

    def job(reporter: ConsoleReporter) -> RunResult:
        from transferctl import recipes

        if resume_run is not None:
            if config is not None or source is not None:
                raise UsageError("--resume uses the config stored in the run; drop -c/--from (key=value overrides may extend it)")
            return recipes.resume(resume_run, overrides or [], command=command, runs_dir=runs_dir, reporter=reporter)
        if command == "finetune":
            return recipes.finetune(source, config, overrides or [], runs_dir=runs_dir, reporter=reporter)
        if config is None:
            raise UsageError("pretrain needs -c CONFIG (or --resume RUN)")
        return recipes.pretrain(config, overrides or [], runs_dir=runs_dir, reporter=reporter)

    return job


def _maybe_launch(nproc: int) -> None:
    """`--nproc N`: run this same command under torchrun with N local processes, and exit with its code."""
    if nproc <= 1 or "LOCAL_RANK" in os.environ:  # already one of torchrun's workers
        return
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "transferctl"]
    raise typer.Exit(subprocess.call([*launcher, *args]))


@app.command()
def evaluate(
    source: str = FromOption,
    overrides: list[str] | None = Overrides,
    runs_dir: Path = RunsDir,
    as_json: bool = JsonFlag,
    quiet: bool = QuietFlag,
) -> None:
    """Evaluate a run on the test split by its method: a task's metrics (accuracy, ...), or k-NN accuracy for encoders."""

    def job(reporter: ConsoleReporter) -> RunResult:
        from transferctl.recipes import evaluate as evaluate_run

        return evaluate_run(source, overrides or [], runs_dir=runs_dir, reporter=reporter)

    _execute(as_json, quiet, "evaluate", job)


@app.command()
def export(
    source: str = FromOption,
    format_names: list[str] = typer.Option(..., "--format", "-f", help="torchscript, onnx or safetensors; repeat for several."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Folder for the files (default: RUN/export/).", file_okay=False),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check the exported model against the eager one (default: on)."),
    tolerance: float = typer.Option(1e-4, "--tolerance", min=0.0, help="Largest max-abs output difference that passes."),
    runs_dir: Path = RunsDir,
    as_json: bool = JsonFlag,
    quiet: bool = QuietFlag,
) -> None:
    """Export a run's model (a trained head's network, or an encoder) for serving, verified against the eager model."""

    def job(reporter: ConsoleReporter) -> ExportResult:
        from transferctl.recipes.export import export_run

        result = export_run(source, format_names, output=output, verify=verify, tolerance=tolerance, runs_dir=runs_dir)
        for name, path in result.files.items():
            parity = result.parity.get(name)
            check = parity.describe() if parity else "not verified"
            reporter.info(f"{name}: {path} ({check})")
        return result

    _execute(as_json, quiet, "export", job)


PredictFrom = typer.Option(
    ..., "--from", help="A run (runs/<id> or an id), or an export folder (its model_card.json).", autocompletion=_complete_run_ids
)
InputsArgument = typer.Argument(
    None, help="Files, folders (recursively), glob patterns, tar shards, or - (one path a line on standard input).", show_default=False
)
ListOption = typer.Option(None, "--list", help="A file of inputs, one a line (paths; for a text model, texts).", dir_okay=False)
TextOption = typer.Option(None, "--text", help="A text to read (text models); repeatable.")
BatchSizeOption = typer.Option(None, "--batch-size", min=1, help="Inputs a batch (default: the run's data.eval_batch_size).")
DeviceOption = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps (default: auto); runs only.")
SkipBadOption = typer.Option(False, "--skip-bad", help="Exit 0 even when some inputs could not be read (their records say why).")


@app.command()
def predict(
    source: str = PredictFrom,
    inputs: list[str] | None = InputsArgument,
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Write the records to FILE (.jsonl or .csv), not stdout.", dir_okay=False
    ),
    top_k: int = typer.Option(1, "--top-k", min=1, help="Classification: also list the K most likely classes."),
    batch_size: int | None = BatchSizeOption,
    device: str | None = DeviceOption,
    list_file: Path | None = ListOption,
    texts: list[str] | None = TextOption,
    masks: Path | None = typer.Option(
        None, "--masks", help="Segmentation: where mask PNGs go (default: beside --output, else predictions/<run id>/).", file_okay=False
    ),
    save_images: Path | None = typer.Option(
        None, "--save-images", help="Detection: write each input image with its boxes drawn on it into DIR.", file_okay=False
    ),
    skip_bad: bool = SkipBadOption,
    runs_dir: Path = RunsDir,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout (counts, files, failures); needs --output."),
    quiet: bool = QuietFlag,
) -> None:
    """Predict with a trained run or its export folder: one record per input (JSON lines on stdout, or --output)."""
    from transferctl.predictions import RecordWriter, check_record_output

    def job() -> Any:
        from transferctl.recipes.prediction import predict_to, prepare_predict

        if as_json and output is None:
            raise UsageError("--json prints a summary on stdout, so the records need --output FILE (.jsonl or .csv)")
        if output is not None:
            check_record_output(output)
        masks_dir = masks or (output.with_name(f"{output.stem}-masks") if output is not None else None)
        predictions = prepare_predict(
            source,
            [Path(i) for i in inputs or []],
            list_file=list_file,
            texts=texts or [],
            top_k=top_k,
            batch_size=batch_size,
            device=device,
            masks=masks_dir,
            save_images=save_images,
            runs_dir=runs_dir,
        )
        as_table = output is None and sys.stdout.isatty()
        writer = RecordWriter(output, None if as_table else sys.stdout)
        with ConsoleReporter(quiet=quiet).counting("predicting") as advance:
            return predict_to(predictions, writer, advance), writer

    report, writer = _guarded(as_json, job)
    if writer.kept:
        _records_table(writer.kept)
    _finish_inputs(report.to_json(), as_json, skip_bad, "predicted")


def _records_table(records: list[dict[str, Any]]) -> None:
    """Records as a table on the terminal: the input, then each flattened field (nested lists as JSON)."""
    from rich.console import Console

    from transferctl.predictions import flattened

    rows = [flattened(r) for r in records]
    headers = list(dict.fromkeys(k for row in rows for k in row))
    ConsoleReporter(console=Console(highlight=False)).columns(None, headers, [[row.get(h) for h in headers] for row in rows])


def _finish_inputs(summary: dict[str, Any], as_json: bool, skip_bad: bool, done: str) -> None:
    """The summary (--json), the failures on stderr, and exit 1 where an input failed (0 with --skip-bad)."""
    failures = summary["failures"]
    if failures:
        shown = "; ".join(f"{f['input']}: {f['error']}" for f in failures[:3])
        more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
        typer.echo(f"error: {len(failures)} of {summary['inputs']} inputs could not be read: {shown}{more}", err=True)
    if as_json:
        typer.echo(json.dumps(finite(summary)))
    code = 1 if failures and not skip_bad else 0
    if summary.get("status") == "completed" and done == "embedded" and not as_json:
        typer.echo(summary["output"])
    raise typer.Exit(code)


@app.command()
def embed(
    source: str = typer.Option(
        ..., "--from", help="A run (runs/<id> or an id): any, pretraining runs included.", autocompletion=_complete_run_ids
    ),
    inputs: list[str] | None = InputsArgument,
    output: Path = typer.Option(
        ..., "--output", "-o", help="FILE.npy (with FILE.jsonl beside it), FILE.safetensors or FILE.csv.", dir_okay=False
    ),
    normalize: bool = typer.Option(False, "--normalize", help="L2-normalize each row, as evaluate's k-NN does."),
    batch_size: int | None = BatchSizeOption,
    device: str | None = DeviceOption,
    list_file: Path | None = ListOption,
    texts: list[str] | None = TextOption,
    skip_bad: bool = SkipBadOption,
    runs_dir: Path = RunsDir,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout (counts, files, failures)."),
    quiet: bool = QuietFlag,
) -> None:
    """Write the encoder's pooled features of every input (one row each, in input order) to --output."""

    def job() -> dict[str, Any]:
        from transferctl.recipes.prediction import embed_to

        with ConsoleReporter(quiet=quiet).counting("embedding") as advance:
            result = embed_to(
                output,
                source,
                [Path(i) for i in inputs or []],
                list_file=list_file,
                texts=texts or [],
                normalize=normalize,
                batch_size=batch_size,
                device=device,
                runs_dir=runs_dir,
                progress=advance,
            )
        return result.to_json()

    _finish_inputs(_guarded(as_json, job), as_json, skip_bad, "embedded")


@app.command()
def quickstart(
    runs_dir: Path = RunsDir,
    as_json: bool = JsonFlag,
    quiet: bool = QuietFlag,
) -> None:
    """Pretrain, fine-tune and evaluate on the MNIST sample shipped with transferctl (on a CPU, offline, in seconds), and
    fine-tune from scratch on the same labels: the last line says whether pretraining beat it."""
    from transferctl.recipes.quickstart import quickstart as run_quickstart
    from transferctl.recipes.quickstart import verdict, verdict_line

    out = _Output(as_json, quiet)
    results = _guarded(as_json, lambda: run_quickstart(runs_dir=runs_dir, reporter=out.reporter), out.reporter.finish)
    found = verdict(results)
    if as_json:
        typer.echo(json.dumps(finite({**results[-1].to_json(), "runs": [r.to_json() for r in results], "verdict": found})))
        return
    for result in results:
        out.result(result, "quickstart")
    out.reporter.info(verdict_line(found))


@app.command("list")
def list_components(
    kind: str | None = typer.Argument(None, help=f"One of: {', '.join(REGISTRIES)}."),
    as_json: bool = JsonFlag,
) -> None:
    """List the registered components (models, losses, optimizers, ...), plugins' marked with their module."""
    _guarded(as_json, load_components)
    if kind is not None and kind not in REGISTRIES:
        _fail(f"unknown kind '{kind}'{did_you_mean(kind, list(REGISTRIES))} (kinds: {', '.join(REGISTRIES)})", 2, as_json)
    kinds = [kind] if kind else list(REGISTRIES)
    listing = {k: {e.name: {"summary": e.summary, "origin": e.origin} for e in REGISTRIES[k]} for k in kinds}
    if as_json:
        typer.echo(json.dumps(listing))
        return
    for k, entries in listing.items():
        typer.echo(f"{k}:")
        for name, entry in entries.items():
            mark = "" if entry["origin"] == "builtin" else f"  [{entry['origin']}]"
            typer.echo(f"  {name:<16} {entry['summary']}{mark}")


# --------------------------------------------------------------------------- runs: what was run

runs_app = typer.Typer(
    help="Inspect the runs under --runs-dir: list them, show one, compare two.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(runs_app, name="runs")
InspectJson = typer.Option(False, "--json", help="Print one JSON object on stdout (tables on stderr otherwise).")
RunArgument = typer.Argument(
    ..., help="A run directory (runs/<id>) or a bare run id.", show_default=False, autocompletion=_complete_run_ids
)


def _inspect(as_json: bool, job: Callable[[], dict[str, Any]], render: Callable[[ConsoleReporter, dict[str, Any]], None]) -> None:
    """A read-only command: one JSON object on stdout, or tables on stderr; the tables render the same object."""
    result = _guarded(as_json, job)
    if as_json:
        typer.echo(json.dumps(finite(result)))
    else:
        render(ConsoleReporter(), result)


@runs_app.command("ls")
def runs_ls(runs_dir: Path = RunsDir, as_json: bool = InspectJson) -> None:
    """List the runs, newest first: command, data set, status, key metric, parent, age."""
    _inspect(as_json, lambda: runs_index.list_runs(runs_dir).to_json(), _render_ls)


@runs_app.command("show")
def runs_show(run: str = RunArgument, runs_dir: Path = RunsDir, as_json: bool = InspectJson) -> None:
    """One run: status, final metrics, timings, lineage (parents, fine-tunes, evaluations, exports) and config."""
    _inspect(as_json, lambda: runs_index.show_run(run, runs_dir), _render_show)


@runs_app.command("diff")
def runs_diff(a: str = RunArgument, b: str = RunArgument, runs_dir: Path = RunsDir, as_json: bool = InspectJson) -> None:
    """Compare two runs: the config keys that differ (dotted) and their final metrics side by side."""
    _inspect(as_json, lambda: runs_index.diff_runs(a, b, runs_dir), _render_diff)


def _metric(brief: dict[str, Any]) -> str | None:
    metric = brief["key_metric"]
    if metric is None:
        return None
    value = metric["value"]
    return f"{metric['name']} {value:.4g}" if isinstance(value, float) else f"{metric['name']} {value}"


def _describe(brief: dict[str, Any]) -> str:
    if brief.get("missing"):
        return f"{brief['run_id']} (not found)"
    metric = _metric(brief)
    return f"{brief['run_id']} ({brief['command']} {brief['trains']}, {brief['status']}" + (f", {metric})" if metric else ")")


def _render_ls(out: ConsoleReporter, listing: dict[str, Any]) -> None:
    rows = [
        [r["run_id"], r["command"], r["trains"], r["dataset"], r["status"], _metric(r), r["parent"], runs_index.age(r["age_s"])]
        for r in listing["runs"]
    ]
    headers = ["run", "command", "trains", "data", "status", "key metric", "parent", "age"]
    out.columns(f"{len(rows)} runs in {listing['runs_dir']}", headers, rows)
    if listing["unreadable"]:
        out.info(f"unreadable (config.yaml or summary.json does not parse): {', '.join(listing['unreadable'])}")


def _render_show(out: ConsoleReporter, run: dict[str, Any]) -> None:
    timings = run["timings"]
    overview = {
        "command": run["command"],
        "trains": run["trains"],
        "data": run["dataset"],
        "status": run["status"],
        "error": run["error"],
        "parent": run["parent"],
        "started": timings["started_at"],
        "finished": timings["finished_at"],
        "duration_s": timings["duration_s"],
        "resumes": len(timings["resumes"]) or None,
        "dir": run["run_dir"],
    }
    out.table(f"run {run['run_id']}", {k: v for k, v in overview.items() if v is not None})
    if run["metrics"]:
        out.table("metrics", run["metrics"])
    lineage = run["lineage"]
    lines = [f"{'  ' * i}<- {_describe(a)}" for i, a in enumerate(reversed(lineage["ancestors"]))]
    depth = len(lines)
    lines.append(f"{'  ' * depth}* {run['run_id']} (this run)")
    lines += _lineage_lines(run, depth + 1, lineage["export"], lineage["children"])
    out.info("lineage:\n" + "\n".join("  " + line for line in lines))
    out.info("config:\n" + yaml.safe_dump(run["config"], sort_keys=False).rstrip())


def _lineage_lines(run: dict[str, Any], depth: int, export: dict[str, Any] | None, children: list[dict[str, Any]]) -> list[str]:
    lines = []
    if export:
        check = "verified" if export["verified"] else "not verified"
        lines.append(f"{'  ' * depth}=> export {export['export_dir']} ({', '.join(export['files'])}; {check})")
    for child in children:
        lines.append(f"{'  ' * depth}-> {_describe(child)}")
        lines += _lineage_lines(child, depth + 1, child["export"], child["children"])
    return lines


def _render_diff(out: ConsoleReporter, diff: dict[str, Any]) -> None:
    out.info(f"A: {_describe(diff['a'])}\nB: {_describe(diff['b'])}")
    if diff["config"]:
        out.columns("config differences", ["key", "A", "B"], [[k, v["a"], v["b"]] for k, v in diff["config"].items()])
    else:
        out.info("configs: identical")
    out.columns("metrics", ["metric", "A", "B"], [[k, v["a"], v["b"]] for k, v in diff["metrics"].items()])


# --------------------------------------------------------------------------- data: shards for streaming

data_app = typer.Typer(help="Prepare data: pack an image folder into tar shards.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(data_app, name="data")


@data_app.command("pack")
def data_pack(
    source: Path = typer.Argument(..., help="An image folder: train/<class>/* and test/<class>/*.", show_default=False),
    dest: Path = typer.Argument(..., help="Where the shards and their manifest.json go (resumes a pack left there).", show_default=False),
    shard_size: int = typer.Option(10_000, "--shard-size", min=1, help="Samples per shard."),
    image_size: int | None = typer.Option(
        None, "--image-size", min=1, help="Resize (shorter side, centre crop), store as PNG; default: files as they are."
    ),
    channels: int = typer.Option(3, "--channels", min=1, max=3, help="With --image-size: 1 (grey) or 3 (RGB)."),
    as_json: bool = InspectJson,
) -> None:
    """Write an image folder into WebDataset-style tar shards (<key>.<ext> + <key>.cls) with a manifest of counts,
    classes, checksums and member offsets; `data.name: shards` reads them. Resumable; no half-written shard keeps its name."""
    from transferctl.data.shards import pack

    def job() -> dict[str, Any]:
        if channels == 2:
            raise UsageError("--channels must be 1 or 3")
        with ConsoleReporter().counting("packing") as advance:
            return pack(source, dest, shard_size=shard_size, image_size=image_size, channels=channels, progress=advance).to_json()

    _inspect(as_json, job, lambda out, result: out.table("data pack", result))


# --------------------------------------------------------------------------- config: what would run

config_app = typer.Typer(
    help="Show the resolved config, or check that everything it names builds.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(config_app, name="config")
ConfigSource = typer.Option(
    None,
    "--from",
    help="A fine-tune's pretraining run (runs/<id> or an id), as `finetune --from` takes it.",
    autocompletion=_complete_run_ids,
)


@config_app.command("show")
def config_show(
    config: Path | None = ConfigOption,
    overrides: list[str] | None = Overrides,
    source: str | None = ConfigSource,
    runs_dir: Path = RunsDir,
    as_json: bool = InspectJson,
) -> None:
    """Print the fully resolved config (every default filled in) on stdout: YAML, or one JSON object with --json."""
    cfg = _guarded(as_json, lambda: check.resolved_config(config, overrides, source=source, runs_dir=runs_dir))
    for note in cfg.notes:
        typer.echo(f"note: {note}", err=True)
    resolved = cfg.to_dict()
    typer.echo(json.dumps(resolved) if as_json else yaml.safe_dump(resolved, sort_keys=False).rstrip("\n"))


@config_app.command("check")
def config_check(
    config: Path | None = ConfigOption,
    overrides: list[str] | None = Overrides,
    source: str | None = ConfigSource,
    runs_dir: Path = RunsDir,
    as_json: bool = InspectJson,
) -> None:
    """Build every component of the config and put one batch through the model on the CPU, without training:
    parameter counts and shapes, or the first problem (exit 2)."""

    def job() -> dict[str, Any]:
        return check.check_config(check.resolved_config(config, overrides, source=source, runs_dir=runs_dir))

    _inspect(as_json, job, _render_check)


def _render_check(out: ConsoleReporter, report: dict[str, Any]) -> None:
    params, shapes, data = report["parameters"], report["shapes"], report["data"]
    out.table(
        f"config check: {report['status']} ({report['method']}, on {report['device']})",
        {
            **report["components"],
            "train / val samples": f"{data['train_samples']:,} / {data['val_samples']:,} ({data['classes']} classes)",
            "parameters": f"{params['total']:,} ({params['trainable']:,} trainable)",
            "encoder / head": f"{params['encoder']:,} / {params['head']:,}",
            "batch": f"{shapes['views']} x {shapes['batch']}",
            "features / output": f"{shapes['features']} / {shapes['output']}",
            "first-batch loss": report["loss"],
            "steps": report["steps"],
            **({"notes": "; ".join(report["notes"])} if report["notes"] else {}),
        },
    )


def main() -> None:
    """Console-script entry point: usage errors become one line and exit 2."""
    code = _run()
    from transferctl import distributed

    if distributed.world().distributed:
        # A torchrun worker that has done its work leaves its process group, then exits without Python's
        # finalization: Gloo's threads can abort a worker there (SIGABRT) after a run that went well.
        # Every file of a run is already written whole (atomically, fsync'd); only the standard streams wait.
        distributed.leave()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _run() -> int:
    """Run the command line; its exit code."""
    try:
        code = app(standalone_mode=False, prog_name="transferctl")  # also under `python -m`: completion keys on the name
    except UsageError as exc:  # raised outside a recipe, e.g. while parsing or loading a --plugin
        message = " ".join(str(exc).split())
        typer.echo(f"error: {message}", err=True)
        if "--json" in sys.argv[1:]:
            typer.echo(json.dumps({"status": "error", "exit_code": exc.exit_code, "error": message}))
        return exc.exit_code
    except Exception as exc:
        # click's (or typer's vendored click's) UsageError: duck-typed, as typer's versions differ.
        if getattr(exc, "exit_code", None) == 2 and hasattr(exc, "format_message"):
            ctx = getattr(exc, "ctx", None)
            where = f"{ctx.command_path} --help" if ctx is not None else "transferctl --help"
            message = f"{exc.format_message()} (see `{where}`)"
            typer.echo(f"error: {message}", err=True)
            if "--json" in sys.argv[1:]:
                typer.echo(json.dumps({"status": "error", "exit_code": 2, "error": message}))
            return 2
        if type(exc).__name__ == "Abort":
            typer.echo("error: interrupted", err=True)
            return 130
        raise
    return code if isinstance(code, int) else 0
