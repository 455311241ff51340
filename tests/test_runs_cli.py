"""`transferctl runs ls|show|diff`: listing, lineage and comparison of runs made in the test."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from transferctl.runs import create_run


def _ok(result):
    assert result.code == 0, result.stderr
    return result.json


def test_ls_show_diff_follow_a_pretrain_finetune_evaluate_export_chain(cli, simclr_config, tmp_path):
    runs = tmp_path / "runs"
    tiny = ["data.labels_per_class=2", "data.batch_size=16", "train.max_steps=2", "--runs-dir", runs, "--json"]
    pre = _ok(cli("pretrain", "-c", simclr_config, "train.max_steps=2", "--runs-dir", runs, "--json"))
    ft1 = _ok(cli("finetune", "--from", pre["run_id"], *tiny))
    ft2 = _ok(cli("finetune", "--from", pre["run_id"], "optimizer.lr=0.01", *tiny))
    ev = _ok(cli("evaluate", "--from", ft1["run_id"], "--runs-dir", runs, "--json"))
    _ok(cli("export", "--from", ft1["run_id"], "--format", "torchscript", "--runs-dir", runs, "--json"))

    for made in (pre, ft1, ev):  # every run's metrics, also as CSV
        rows = [json.loads(line) for line in (Path(made["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        with open(Path(made["run_dir"]) / "metrics.csv", newline="") as f:
            table = list(csv.DictReader(f))
        assert list(table[0]) == list(dict.fromkeys(k for r in rows for k in r))
        assert table == [{k: "" if r.get(k) is None else str(r[k]) for k in table[0]} for r in rows]

    listing = _ok(cli("runs", "ls", "--runs-dir", runs, "--json"))
    assert [r["run_id"] for r in listing["runs"]] == [ev["run_id"], ft2["run_id"], ft1["run_id"], pre["run_id"]]
    by_id = {r["run_id"]: r for r in listing["runs"]}
    assert by_id[ev["run_id"]]["key_metric"] == {"name": "accuracy", "value": ev["metrics"]["accuracy"]}
    assert by_id[ft1["run_id"]]["key_metric"]["name"] == "best_val_accuracy"
    assert by_id[pre["run_id"]]["key_metric"] == {"name": "best_val_loss", "value": pre["metrics"]["best_val_loss"]}
    assert (by_id[pre["run_id"]]["command"], by_id[pre["run_id"]]["method"], by_id[pre["run_id"]]["dataset"]) == (
        "pretrain",
        "simclr",
        "mnist",
    )
    # what each run trains, without repeating the command: "finetune finetune" was printed before
    trains = {made["run_id"]: (by_id[made["run_id"]]["command"], by_id[made["run_id"]]["trains"]) for made in (pre, ft1, ev)}
    assert trains == {
        pre["run_id"]: ("pretrain", "simclr"),
        ft1["run_id"]: ("finetune", "classification"),
        ev["run_id"]: ("evaluate", "finetune classification"),
    }
    assert (by_id[ft1["run_id"]]["method"], by_id[ft1["run_id"]]["task"]) == ("finetune", "classification")
    assert by_id[ev["run_id"]]["parent"] == ft1["run_id"] and all(r["status"] == "completed" for r in listing["runs"])
    assert all(r["age_s"] >= 0 for r in listing["runs"])

    shown = _ok(cli("runs", "show", pre["run_id"], "--runs-dir", runs, "--json"))
    assert shown["config"]["method"] == {"name": "simclr"} and shown["metrics"] == pre["metrics"]
    assert shown["timings"]["duration_s"] > 0 and shown["lineage"]["ancestors"] == []
    children = shown["lineage"]["children"]
    assert [c["run_id"] for c in children] == [ft1["run_id"], ft2["run_id"]]
    assert children[0]["export"]["files"] == {"torchscript": str(Path(ft1["run_dir"]) / "export" / "model.pt")}
    assert children[0]["export"]["parity_passed"] is True and children[1]["export"] is None
    assert [g["run_id"] for g in children[0]["children"]] == [ev["run_id"]] and children[1]["children"] == []

    up = _ok(cli("runs", "show", ev["run_dir"], "--json"))  # by path: lineage from the runs beside it
    assert [a["run_id"] for a in up["lineage"]["ancestors"]] == [ft1["run_id"], pre["run_id"]]

    diff = _ok(cli("runs", "diff", ft1["run_id"], ft2["run_id"], "--runs-dir", runs, "--json"))
    assert diff["config"] == {"optimizer.lr": {"a": 0.05, "b": 0.01}}
    assert diff["metrics"]["step"] == {"a": 2, "b": 2}
    assert set(diff["metrics"]) == set(ft1["metrics"]) | set(ft2["metrics"])

    human = cli("runs", "ls", "--runs-dir", runs)
    assert human.code == 0 and human.stdout == ""
    assert all(r["run_id"] in human.stderr for r in listing["runs"]) and "best_val_loss" in human.stderr
    assert "finetune finetune" not in human.stderr and "evaluate finetune" not in human.stderr
    tree = cli("runs", "show", pre["run_id"], "--runs-dir", runs)
    assert tree.code == 0 and f"-> {ev['run_id']}" in tree.stderr and "=> export" in tree.stderr
    assert "optimizer.lr" in cli("runs", "diff", ft1["run_id"], ft2["run_id"], "--runs-dir", runs).stderr


def _fake_run(runs: Path, label: str, parent: str | None = None, metrics: dict | None = None, **config) -> str:
    run = create_run(runs, label, {"method": "simclr", "data": {"name": "mnist"}, **config}, parent=parent, command="pretrain")
    run.update_summary(status="completed", metrics=metrics or {})
    return run.id


def test_unknown_runs_are_one_line_errors_with_a_suggestion(cli, tmp_path):
    runs = tmp_path / "runs"
    run_id = _fake_run(runs, "simclr-mnist")
    for args in (["show", run_id[-4:]], ["diff", run_id, run_id[:-1] + "x"]):
        result = cli("runs", *args, "--runs-dir", runs)
        assert result.code == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert "no such run directory or run id" in result.stderr and f"did you mean '{run_id}'" in result.stderr
    missing = cli("runs", "ls", "--runs-dir", tmp_path / "nowhere", "--json")
    assert missing.code == 2 and "no such folder" in missing.json["error"]


def test_listing_skips_non_runs_reports_unreadable_ones_and_missing_parents(cli, tmp_path):
    runs = tmp_path / "runs"
    orphan = _fake_run(runs, "orphan", parent="gone-run", metrics={"val_loss": 1.5, "train_loss": 2.0})
    (runs / "not-a-run").mkdir()
    broken = runs / _fake_run(runs, "broken")
    (broken / "summary.json").write_text("{not json")
    listing = _ok(cli("runs", "ls", "--runs-dir", runs, "--json"))
    assert [r["run_id"] for r in listing["runs"]] == [orphan] and listing["unreadable"] == [broken.name]
    assert listing["runs"][0]["key_metric"] == {"name": "val_loss", "value": 1.5}
    shown = _ok(cli("runs", "show", orphan, "--runs-dir", runs, "--json"))
    assert shown["lineage"]["ancestors"] == [{"run_id": "gone-run", "missing": True}]


def test_diff_of_configs_uses_dotted_keys_and_null_for_missing(cli, tmp_path):
    runs = tmp_path / "runs"
    a = _fake_run(runs, "a", train={"epochs": 3, "seed": 0}, metrics={"val_loss": 1.0})
    b = _fake_run(runs, "b", train={"epochs": 5, "seed": 0}, extra={"k": 1}, metrics={"val_loss": 0.5, "step": 9})
    diff = _ok(cli("runs", "diff", a, b, "--runs-dir", runs, "--json"))
    assert diff["config"] == {"train.epochs": {"a": 3, "b": 5}, "extra.k": {"a": None, "b": 1}}
    assert diff["metrics"] == {"val_loss": {"a": 1.0, "b": 0.5}, "step": {"a": None, "b": 9}}
    assert diff["a"]["run_id"] == a and diff["b"]["run_id"] == b


@pytest.mark.parametrize("seconds, text", [(5, "5s"), (125, "2m"), (7300, "2h"), (3 * 86400, "3d")])
def test_age_is_short(seconds, text):
    from transferctl.runs_index import age

    assert age(seconds) == text


def test_shell_completion_offers_subcommands_and_run_ids(cli, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    first, second = _fake_run(runs, "simclr-mnist"), _fake_run(runs, "finetune-mnist")
    monkeypatch.setenv("_TRANSFERCTL_COMPLETE", "complete_bash")

    def complete(line: str) -> list[str]:
        monkeypatch.setenv("COMP_WORDS", line)
        monkeypatch.setenv("COMP_CWORD", str(len(line.split()) - (0 if line.endswith(" ") else 1)))
        result = cli()
        assert result.code == 0, result.stderr
        return result.stdout.split()

    assert complete("transferctl runs ") == ["ls", "show", "diff"]
    assert complete(f"transferctl runs show --runs-dir {runs} ") == sorted([first, second])
    assert complete(f"transferctl evaluate --runs-dir {runs} --from {second[:-3]}") == [second]
    monkeypatch.delenv("_TRANSFERCTL_COMPLETE")
    # Typer finds the shell from the process tree (shellingham), which a suite started outside a shell lacks
    monkeypatch.setattr("typer.completion._get_shell_name", lambda: "bash")
    script = cli("--show-completion")
    assert script.code == 0 and "_TRANSFERCTL_COMPLETE=complete_bash" in script.stdout


def test_a_damaged_run_is_a_one_line_usage_error(cli, tmp_path):
    runs = tmp_path / "runs"
    listed, binary = _fake_run(runs, "listed"), _fake_run(runs, "binary")
    (runs / listed / "config.yaml").write_text("- a list\n- not a config\n")
    (runs / binary / "summary.json").write_bytes(b"\xff\xfe\x00garbage")
    for args in (["show", listed], ["diff", binary, listed]):
        result = cli("runs", *args, "--runs-dir", runs, "--json")
        assert result.code == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "not a mapping" in result.json["error"] or "cannot read the run's config or summary" in result.json["error"]
    assert sorted(_ok(cli("runs", "ls", "--runs-dir", runs, "--json"))["unreadable"]) == sorted([listed, binary])
