"""End-to-end: the real CLI through pretrain -> finetune -> evaluate on small idx digits, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import make_mnist_root, write_config
from transferctl.build import build_network
from transferctl.components import load_components
from transferctl.config import load_config
from transferctl.registry import REGISTRIES

RUN_FILES = {"config.yaml", "summary.json", "environment.json", "metrics.jsonl", "log.txt", "checkpoints"}


def checkpoint(run_dir, name="last"):
    return torch.load(run_dir / "checkpoints" / f"{name}.pt", weights_only=True)


def encoder_state(state):
    return {k: v for k, v in state["model"].items() if k.startswith("encoder.")}


@pytest.fixture
def pretrained(cli, simclr_config, tmp_path):
    result = cli("pretrain", "-c", simclr_config, "train.max_steps=10", "--runs-dir", tmp_path / "runs", "--json")
    assert result.code == 0, result.stderr
    return result.json


def test_whole_chain_writes_complete_runs(cli, pretrained, tmp_path):
    runs = tmp_path / "runs"
    pre_dir = Path(pretrained["run_dir"])
    assert pretrained["status"] == "completed" and pretrained["metrics"]["step"] == 10
    assert {p.name for p in pre_dir.iterdir()} >= RUN_FILES
    assert {"last.pt", "best.pt"} <= {p.name for p in (pre_dir / "checkpoints").iterdir()}
    summary = json.loads((pre_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["duration_s"] > 0 and summary["parent"] is None
    env = json.loads((pre_dir / "environment.json").read_text())
    assert env["device"] == "cpu" and env["seed"] == 0 and env["torch"] == torch.__version__
    assert yaml.safe_load((pre_dir / "config.yaml").read_text())["loss"] == {"name": "nt_xent", "temperature": 0.5}
    rows = [json.loads(line) for line in (pre_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all("val_loss" in r for r in rows)

    # finetune by bare run id, resolved under --runs-dir
    tuned = cli(
        "finetune",
        "--from",
        pretrained["run_id"],
        "data.labels_per_class=5",
        "data.batch_size=16",
        "train.max_steps=8",
        "--runs-dir",
        runs,
        "--json",
    )
    assert tuned.code == 0, tuned.stderr
    tuned = tuned.json
    assert tuned["parent"] == pretrained["run_id"] and "val_accuracy" in tuned["metrics"]
    tuned_cfg = yaml.safe_load((Path(tuned["run_dir"]) / "config.yaml").read_text())
    assert tuned_cfg["method"] == {"name": "finetune"} and tuned_cfg["task"] == {"name": "classification"}
    assert tuned_cfg["model"]["widths"] == [8, 16]
    assert tuned_cfg["data"]["labels_per_class"] == 5 and tuned_cfg["finetune"]["source"] == pretrained["run_dir"]

    evaluated = cli("evaluate", "--from", tuned["run_dir"], "--runs-dir", runs, "--json")
    assert evaluated.code == 0, evaluated.stderr
    metrics = evaluated.json["metrics"]
    assert metrics["test_images"] == 200
    confusion = json.loads((Path(evaluated.json["run_dir"]) / "confusion.json").read_text())
    assert sum(map(sum, confusion["confusion"])) == 200 and len(confusion["per_class_accuracy"]) == 10
    correct = sum(confusion["confusion"][i][i] for i in range(10))
    assert correct / 200 == pytest.approx(metrics["accuracy"])

    knn = cli("evaluate", "--from", pretrained["run_dir"], "eval.knn_k=5", "--runs-dir", runs, "--json")
    assert knn.code == 0, knn.stderr
    assert "accuracy" not in knn.json["metrics"]
    assert knn.json["metrics"]["knn_accuracy"] == pytest.approx(knn_by_hand(Path(pretrained["run_dir"]), k=5), abs=1 / 200)
    assert knn.json["metrics"]["knn_accuracy"] > 0.5  # digits' neighbours share their class far above chance (0.1)
    assert len(list(runs.iterdir())) == 4


def knn_by_hand(run_dir: Path, k: int, temperature: float = 0.07) -> float:
    """Weighted k-NN accuracy, one test image at a time: the training split's features vote by exp(cosine / T)."""
    from transferctl.build import load_trained
    from transferctl.runs import read_run

    record = read_run(str(run_dir), run_dir.parent)
    trained = load_trained(record, load_config(None, base=record.config), splits=("train", "test"))
    encoder, bank, test = trained.network.encoder.eval(), trained.split(train=True), trained.split(train=False)

    def features(data):
        with torch.no_grad():
            return torch.nn.functional.normalize(encoder(trained.modality.model_input(data.inputs, data)), dim=1)

    bank_features, correct = features(bank), 0
    for feature, label in zip(features(test), test.targets, strict=True):
        top = (bank_features @ feature).topk(k)
        votes = torch.zeros(10).index_add_(0, bank.targets[top.indices], (top.values / temperature).exp())
        correct += int(votes.argmax() == label)
    return correct / len(test)


def test_finetune_loads_the_encoder_and_a_linear_probe_keeps_it(cli, pretrained, tmp_path):
    probe = cli(
        "finetune",
        "--from",
        pretrained["run_dir"],
        "finetune.freeze_encoder=true",
        "data.labels_per_class=5",
        "data.batch_size=16",
        "train.max_steps=4",
        "--runs-dir",
        tmp_path / "runs",
        "--json",
    )
    assert probe.code == 0, probe.stderr
    source, probed = encoder_state(checkpoint(Path(pretrained["run_dir"]))), encoder_state(checkpoint(Path(probe.json["run_dir"])))
    assert source.keys() == probed.keys()
    assert all(torch.equal(source[k], probed[k]) for k in source)  # weights and batch-norm statistics
    head = {k.removeprefix("head."): v for k, v in checkpoint(Path(probe.json["run_dir"]))["model"].items() if k.startswith("head.")}
    torch.manual_seed(0)  # the run's seed: its network, and so its head, started from this init
    cfg = load_config(None, base=yaml.safe_load((Path(probe.json["run_dir"]) / "config.yaml").read_text()))
    initial = build_network(cfg, (1, 28, 28), 10).head.state_dict()
    assert head.keys() == initial.keys() and head["2.weight"].shape == (10, 16)  # standardize, dropout, linear: 16 features
    assert not torch.equal(head["2.weight"], initial["2.weight"])  # the head trained, the encoder did not


def test_finetune_from_scratch_starts_from_random_weights(cli, pretrained, tmp_path, digits_root):
    config = write_config(
        tmp_path / "ft.yaml",
        f"""\
method: finetune
model: {{name: cnn, widths: [8, 16]}}
data: {{name: mnist, root: {digits_root}, labels_per_class: 5, batch_size: 16}}
train: {{max_steps: 2, device: cpu}}
finetune: {{freeze_encoder: true}}
""",
    )
    scratch = cli("finetune", "-c", config, "--runs-dir", tmp_path / "runs", "--json")
    assert scratch.code == 0, scratch.stderr
    assert scratch.json["parent"] is None
    fresh, pre = encoder_state(checkpoint(Path(scratch.json["run_dir"]))), encoder_state(checkpoint(Path(pretrained["run_dir"])))
    assert not torch.equal(fresh["encoder.0.weight"], pre["encoder.0.weight"])
    torch.manual_seed(0)
    initial = build_network(load_config(config), (1, 28, 28), 10).encoder.state_dict()
    assert torch.equal(fresh["encoder.0.weight"], initial["0.weight"])  # frozen, so still the seeded init


def test_a_recipes_model_gives_way_to_the_source_encoder_unless_the_command_line_names_one(cli, pretrained, tmp_path):
    recipe = Path(__file__).parents[1] / "configs" / "finetune_imagefolder.yaml"  # names resnet18 with ImageNet weights
    args = ("config", "show", "--from", pretrained["run_dir"], "-c", recipe, "data.root=my_images", "--runs-dir", tmp_path / "runs")
    shown = cli(*args)
    assert shown.code == 0, shown.stderr
    assert shown.stderr.strip() == "note: model: the recipe's model section gives way to the source run's encoder ('cnn')"
    model = yaml.safe_load(shown.stdout)["model"]
    assert (model["name"], model["widths"], model["weights"]) == ("cnn", [8, 16], None)
    refused = cli(*args, "model.name=resnet18")
    assert refused.code == 2 and "model.name='resnet18' on the command line differs from the source run's encoder" in refused.stderr


def test_a_shipped_recipe_switched_to_an_own_data_set_runs_with_a_note(cli, tmp_path):
    from tests.test_audio import make_audio_folder

    root = make_audio_folder(tmp_path / "clips", per_class=(4, 1))
    recipe = Path(__file__).parents[1] / "configs" / "simclr_fsdd.yaml"  # sets data.split, which only fsdd takes
    own = ("data.name=audio_folder", f"data.root={root}", "data.n_mels=32", "data.batch_size=8", "model.widths=[8,16]")
    result = cli("pretrain", "-c", recipe, *own, "train.max_steps=2", "train.device=cpu", "--runs-dir", tmp_path / "runs", "--json")
    assert result.code == 0, result.stderr
    assert "note: data.split: set for data set 'fsdd', which 'audio_folder' does not take; dropped" in result.stderr
    log = (Path(result.json["run_dir"]) / "log.txt").read_text()
    assert (
        "note: data.split: set for data set 'fsdd'" in log
        and "split" not in yaml.safe_load((Path(result.json["run_dir"]) / "config.yaml").read_text())["data"]
    )
    strict = cli("config", "show", "-c", recipe, *own, "data.split=speakers")  # the command line's own options stay strict
    assert strict.code == 2 and "data.split: unknown option for data 'audio_folder'" in strict.stderr

    # The fine-tune recipe names fsdd too: naming the source run's data set reads the source's clips as it read them.
    finetune_recipe = Path(__file__).parents[1] / "configs" / "finetune10_fsdd.yaml"
    args = ("--from", result.json["run_dir"], "-c", finetune_recipe, "data.name=audio_folder", "--runs-dir", tmp_path / "runs")
    shown = cli("config", "show", *args)
    assert shown.code == 0, shown.stderr
    data = yaml.safe_load(shown.stdout)["data"]
    assert (data["root"], data["n_mels"]) == (str(root), 32)


def _runs_snapshot(runs):
    return sorted(str(p) for p in runs.rglob("*")) if runs.exists() else None


@pytest.mark.parametrize(
    "args, expected",
    [
        (["pretrain", "-c", "{cfg}", "train.epoch=3"], "train.epoch: unknown key; did you mean 'epochs'?"),
        (["pretrain", "-c", "{cfg}", "model.name=cnnn"], "unknown model 'cnnn'; did you mean 'cnn'?"),
        (["pretrain", "-c", "{cfg}", "data.batch_size=-4"], "data.batch_size"),
        (["pretrain", "-c", "{cfg}", "data.batch_size=5000"], "data.batch_size=5000 is larger than the 540 training samples"),
        (["pretrain", "-c", "{cfg}", "data.root={tmp}/nowhere"], "data set 'mnist' not found: looked for"),
        (["pretrain", "-c", "{cfg}", "method=finetune"], "is run by `transferctl finetune`"),
        (["pretrain", "-c", "{cfg}", "method=simclar"], "method.name: unknown method 'simclar'; did you mean 'simclr'?"),
        (
            ["pretrain", "-c", "{cfg}", "method.name=supervised", "task=clasification"],
            "unknown task 'clasification'; did you mean 'classification'?",
        ),
        (
            ["finetune", "-c", "{cfg}", "method=finetune", "task.name=clasification"],
            "unknown task 'clasification'; did you mean 'classification'?",
        ),
        (["pretrain", "-c", "{cfg}", "task=classification"], "method 'simclr' trains no task head"),
        (["pretrain", "-c", "{binary}"], "not a text file (it is not UTF-8)"),
        (["pretrain", "-c", "{tmp}/missing.yaml"], "config file not found"),
        (["pretrain", "-c", "{bad_yaml}"], "malformed YAML at line"),
        (["pretrain", "-c", "{cfg}", "epochs"], "expected dotted.key=value"),
        (["pretrain"], "pretrain needs -c CONFIG"),
        (["pretrain", "--bogus"], "No such option: --bogus"),
        (["pretrain", "--resume", "{tmp}/nowhere"], "no such run directory"),
        (["finetune"], "finetune needs --from RUN"),
        (["finetune", "--from", "no-such-run"], "no such run directory or run id"),
        (["finetune", "--from", "{tmp}"], "is not a transferctl run"),
        (["finetune", "-c", "{cfg}"], "is run by `transferctl pretrain`"),
        (["evaluate", "--from", "nope"], "no such run directory or run id"),
        (["pretrain", "-c", "{cfg}", "model.widths=[8,8,8,8,8,8]"], "does not fit 1x28x28 inputs"),
        (["pretrain", "-c", "{cfg}", "data.root={truncated}"], "is unreadable"),
        (["pretrain", "-c", "{cfg}", "data.name=image_folder", "data.test_dir=train", "data.root={tmp}"], "must be two different folders"),
        (["pretrain", "--json", "--bogus"], "No such option"),
        (["pretrain", "-c", "{cfg}", "train.device=cuda:0" if not torch.cuda.is_available() else "train.device=tpu"], "train.device"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(cli, simclr_config, tmp_path, args, expected):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("method: simclr\ndata: [unclosed\n")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    truncated = make_mnist_root(tmp_path / "truncated", 100, 10)
    images = truncated / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    runs = tmp_path / "runs"
    before = _runs_snapshot(runs)
    args = [a.format(cfg=simclr_config, tmp=tmp_path, bad_yaml=bad_yaml, truncated=truncated, binary=binary) for a in args]
    result = cli(*args, "--runs-dir", runs)
    assert result.code == 2, result.stderr
    assert expected in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert _runs_snapshot(runs) == before
    if "--json" in args:
        assert result.json["exit_code"] == 2


def test_labels_per_class_larger_than_a_class(cli, pretrained, tmp_path):
    result = cli("finetune", "--from", pretrained["run_dir"], "data.labels_per_class=500", "--runs-dir", tmp_path / "runs")
    assert result.code == 2 and "labels_per_class=500 is larger than class" in result.stderr


def test_json_errors_are_one_object_on_stdout(cli, simclr_config, tmp_path):
    result = cli("pretrain", "-c", simclr_config, "train.epoch=1", "--json", "--runs-dir", tmp_path / "runs")
    assert result.code == 2
    assert result.json == {"status": "error", "exit_code": 2, "error": result.stderr.removeprefix("error: ").strip()}


def test_runtime_failure_exits_1_and_marks_the_run_failed(cli, simclr_config, tmp_path):
    runs = tmp_path / "runs"
    result = cli(
        "pretrain",
        "-c",
        simclr_config,
        "optimizer.name=sgd",
        "optimizer.lr=1e12",
        "optimizer.weight_decay=0",
        "train.log_every=1",
        "--runs-dir",
        runs,
    )
    assert result.code == 1, result.stderr
    assert "loss became nan" in result.stderr.lower() or "loss became inf" in result.stderr.lower()
    assert "log: " in result.stderr and "Traceback" not in result.stderr
    (run_dir,) = list(runs.iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "loss became" in summary["error"]
    assert "Traceback" in (run_dir / "log.txt").read_text()


def test_quiet_human_mode_prints_only_the_run_dir(cli, simclr_config, tmp_path):
    result = cli("pretrain", "-c", simclr_config, "train.max_steps=2", "--quiet", "--runs-dir", tmp_path / "runs")
    assert result.code == 0 and result.stderr == ""
    assert result.stdout.strip().startswith(str(tmp_path / "runs"))


def test_human_mode_reports_progress_on_stderr(cli, simclr_config, tmp_path):
    result = cli("pretrain", "-c", simclr_config, "train.max_steps=4", "--runs-dir", tmp_path / "runs")
    assert result.code == 0
    assert "step 2/4" in result.stderr and "samples/s" in result.stderr and "val_loss" in result.stderr


def test_a_log_gets_a_line_every_log_every_steps_whatever_the_epoch_length():
    """A 200-step fine-tune of 2-step epochs, validated every epoch, logged every 10 steps, without a terminal: the
    engine's calls give 20 lines (issue 35: at most 25), each validation that ends on a logged step on that step's
    line, the last row on the last."""
    import io

    from rich.console import Console

    from transferctl.console import ConsoleReporter

    out = io.StringIO()
    reporter = ConsoleReporter(console=Console(file=out, width=400))
    reporter.start(200, "finetune")
    for step in range(1, 201):
        if step % 10 == 0:
            reporter.progress(step, {"loss": 1.0, "lr": 0.1, "samples_per_s": 100.0})
        if step % 2 == 0:
            reporter.epoch({"epoch": step // 2, "step": step, "train_loss": 1.0, "lr": 0.1, "val_accuracy": step / 200})
    reporter.finish()
    lines = out.getvalue().splitlines()[1:]  # after the start line
    assert len(lines) == 20 and all(line.startswith(f"step {10 * (i + 1)}/200") for i, line in enumerate(lines))
    assert "val_accuracy 0.05" in lines[0] and lines[-1].endswith("val_accuracy 1")
    reporter = ConsoleReporter(console=Console(file=(rows := io.StringIO()), width=400))
    reporter.start(0, "evaluating")
    reporter.epoch({"accuracy": 0.9})  # a run without steps: its row as it is
    assert rows.getvalue().splitlines()[-1] == "accuracy 0.9"


def test_list_shows_every_registered_component_and_version(cli):
    load_components()  # what is built in is pinned once, in test_registry.py: here the listing must match the registries
    registered = {kind: {e.name: {"summary": e.summary, "origin": e.origin} for e in registry} for kind, registry in REGISTRIES.items()}
    assert all(registered.values())  # every kind has components: the comparisons below are not of empty listings
    everything = cli("list", "--json")
    assert everything.code == 0 and everything.json == registered
    losses = cli("list", "losses", "--json")
    assert losses.code == 0 and losses.json == {"losses": registered["losses"]}
    human = cli("list")
    assert human.code == 0
    listed: dict[str, list[str]] = {}
    for line in human.stdout.splitlines():
        if not line.startswith(" "):
            listed[line.removesuffix(":")] = []
        else:
            listed[list(listed)[-1]].append(line.split()[0])
    assert listed == {kind: list(entries) for kind, entries in registered.items()}
    assert cli("list", "los").code == 2
    version = cli("--version")
    assert version.code == 0 and version.stdout.startswith("transferctl ")


def test_console_script_entry_point_and_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "transferctl", "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("transferctl ")
    bad = subprocess.run([sys.executable, "-m", "transferctl", "pretrain", "-c", str(tmp_path / "x.yaml")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_quickstart_runs_the_whole_chain_offline(cli, tmp_path):
    """The README's main-job command: the shipped sample, pretrain -> k-NN -> finetune -> test."""
    result = cli("quickstart", "--runs-dir", tmp_path / "runs", "--json")
    assert result.code == 0, result.stderr
    pretrained, knn, tuned, tested, scratch, scratch_tested = result.json["runs"]
    assert knn["parent"] == pretrained["run_id"] and tested["parent"] == tuned["run_id"]
    assert knn["metrics"]["knn_accuracy"] > 0.7  # 10 classes: chance is 0.1
    assert tested["metrics"]["accuracy"] > 0.7 and tested["metrics"]["test_images"] == 500
    assert result.json["run_id"] == scratch_tested["run_id"] and scratch_tested["parent"] == scratch["run_id"]
    # the verdict: the same recipe and labels from a random encoder, side by side
    stored = {r["run_id"]: yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text()) for r in (tuned, scratch)}
    assert stored[scratch["run_id"]]["finetune"]["source"] is None and stored[tuned["run_id"]]["finetune"]["source"]
    assert stored[scratch["run_id"]]["data"] == stored[tuned["run_id"]]["data"]
    verdict = result.json["verdict"]
    assert (verdict["pretrained_run"], verdict["scratch_run"]) == (tuned["run_id"], scratch["run_id"])
    assert verdict["pretrained_accuracy"] == tested["metrics"]["accuracy"]
    assert verdict["scratch_accuracy"] == scratch_tested["metrics"]["accuracy"]
    assert verdict["difference"] == pytest.approx(verdict["pretrained_accuracy"] - verdict["scratch_accuracy"])


def test_from_must_name_a_training_run(cli, pretrained, tmp_path):
    runs = tmp_path / "runs"
    evaluated = cli("evaluate", "--from", pretrained["run_dir"], "--runs-dir", runs, "--json").json
    for command in (["finetune"], ["evaluate"], ["export", "--format", "onnx"]):
        result = cli(*command, "--from", evaluated["run_dir"], "--runs-dir", runs)
        assert result.code == 2 and "that is a `evaluate` run" in result.stderr


@pytest.mark.parametrize(("section", "note"), [("cnn", False), ("mlp", True), ("[cnn]", None)])
def test_finetune_config_with_a_model_named_alone(cli, pretrained, tmp_path, section, note):
    config = write_config(tmp_path / "ft.yaml", f"method: finetune\nmodel: {section}\n")
    result = cli("config", "show", "--from", pretrained["run_dir"], "-c", config, "--runs-dir", tmp_path / "runs")
    if note is None:
        assert result.code == 2 and "model: expected a section" in result.stderr
        return
    assert result.code == 0 and yaml.safe_load(result.stdout)["model"]["widths"] == [8, 16]
    assert ("gives way to the source run's encoder" in result.stderr) is note


def test_a_classifier_batch_larger_than_the_labelled_set_trains_on_all_of_it(cli, pretrained, tmp_path):
    result = cli(
        "finetune",
        "--from",
        pretrained["run_dir"],
        "data.labels_per_class=5",
        "data.batch_size=64",
        "train.epochs=2",
        "--runs-dir",
        tmp_path / "runs",
        "--json",
    )
    assert result.code == 0, result.stderr
    assert result.json["metrics"]["step"] == 2  # one batch of all 50 images an epoch


def test_unexpected_errors_are_one_line_exit_1_and_json(cli, simclr_config, tmp_path, monkeypatch):
    from transferctl import recipes

    def broken(*args, **kwargs):
        raise ValueError("something\nunforeseen")

    monkeypatch.setattr(recipes, "pretrain", broken)
    result = cli("pretrain", "-c", simclr_config, "--json", "--runs-dir", tmp_path / "runs")
    assert result.code == 1 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.json["exit_code"] == 1 and "ValueError: something unforeseen" in result.json["error"]


def test_json_output_turns_nan_into_null():
    from transferctl.cli import finite

    assert json.dumps(finite({"loss": float("nan"), "rows": [float("inf"), 1.0]})) == '{"loss": null, "rows": [null, 1.0]}'
