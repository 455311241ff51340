"""Fingerprint of a fixed-seed chain: every metric and a digest of every saved weight, to show that a change
to transferctl's code changes no result.

Runs the quickstart on the shipped sample, then (with the real data) short chains through the shipped recipes.
Images (MNIST): SimCLR pretraining -> k-NN evaluation -> semi-supervised fine-tune (pseudo-labels, alignment, label
propagation, weight averaging) -> evaluation -> export in every format; supervised pretraining -> the
built-in fine-tune recipe -> evaluation; a linear probe; a rotation regression, a scene segmentation and detection
fine-tune -> evaluation -> export. Audio (FSDD) and text (AG News, its tokenizer pinned with
`data.tokenizer.path`, since a trained WordPiece vocabulary differs between processes): SimCLR pretraining ->
k-NN evaluation -> semi-supervised fine-tune -> evaluation -> export. Timings (samples/s, seconds) are left out:
everything else must be bit-identical between two versions of the code on the same machine.

    python benchmarks/fingerprint.py --data-dir ../shared/data --out before.json
    (change the code)
    python benchmarks/fingerprint.py --data-dir ../shared/data --out after.json --compare before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from transferctl.recipes import evaluate, finetune, pretrain, quickstart

try:  # 0.9 moved the export recipe beside the others
    from transferctl.recipes.export import export_run
except ImportError:
    from transferctl.export import export_run

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
TEXT_TOKENIZER = Path(__file__).resolve().parent / "results" / "fingerprint" / "ag_news_wordpiece_8000.json"
TIMING_KEYS = {"images_per_s", "samples_per_s", "epoch_time_s", "duration_s", "peak_gpu_memory_mb"}


def weights_digest(path: Path) -> str:
    """sha256 over the checkpoint's model weights: names, dtypes, shapes and bytes, in name order."""
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].reshape(-1).contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def untimed(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def fingerprint(run_dir: Path) -> dict[str, Any]:
    """What a run computed: its metrics rows, its final metrics and its weights."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    out: dict[str, Any] = {"rows": [untimed(r) for r in rows], "metrics": untimed(summary.get("metrics") or {})}
    for name in ("last", "best"):
        path = run_dir / "checkpoints" / f"{name}.pt"
        if path.is_file():
            out[f"{name}_weights"] = weights_digest(path)
    return out


def chain(data_dir: Path | None, runs: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for label, result in zip(
        (
            "quickstart/pretrain",
            "quickstart/knn",
            "quickstart/finetune",
            "quickstart/evaluate",
            "quickstart/scratch",
            "quickstart/scratch_evaluate",
        ),
        quickstart(runs_dir=runs),
        strict=True,
    ):
        results[label] = fingerprint(result.run_dir)
    if data_dir is None:
        return results
    root = [f"data.root={data_dir.resolve()}"]
    simclr = pretrain(CONFIGS / "simclr_mnist.yaml", [*root, "train.max_steps=40", "train.log_every=10"], runs_dir=runs)
    results["simclr"] = fingerprint(simclr.run_dir)
    results["simclr/knn"] = fingerprint(evaluate(str(simclr.run_dir), runs_dir=runs).run_dir)
    semi = [
        "train.max_steps=40",
        "finetune.unlabeled.align=true",
        "finetune.unlabeled.propagate=true",
        "train.ema_decay=0.9",
        "finetune.l2_sp=0.01",
    ]
    tuned = finetune(str(simclr.run_dir), CONFIGS / "finetune10_mnist.yaml", semi, runs_dir=runs)
    results["finetune10"] = fingerprint(tuned.run_dir)
    results["finetune10/evaluate"] = fingerprint(evaluate(str(tuned.run_dir), runs_dir=runs).run_dir)
    exported = export_run(str(tuned.run_dir), ["torchscript", "onnx", "safetensors"], runs_dir=runs)
    results["finetune10/export"] = exported_metrics(exported)
    supervised = pretrain(CONFIGS / "supervised_mnist.yaml", [*root, "train.max_steps=30"], runs_dir=runs)
    results["supervised"] = fingerprint(supervised.run_dir)
    default = finetune(str(supervised.run_dir), None, ["train.max_steps=30"], runs_dir=runs)
    results["supervised/finetune"] = fingerprint(default.run_dir)
    results["supervised/finetune/evaluate"] = fingerprint(evaluate(str(default.run_dir), runs_dir=runs).run_dir)
    probe = finetune(str(simclr.run_dir), CONFIGS / "linear_mnist.yaml", ["train.max_steps=20"], runs_dir=runs)
    results["linear"] = fingerprint(probe.run_dir)
    dense = ["train.max_steps=20", "train.log_every=10", "data.labeled_samples=200"]
    dense_tasks = (
        ("regression", "regress_mnist_rotation.yaml"),
        ("segmentation", "segment_mnist_scenes.yaml"),
        ("detection", "detect_mnist_scenes.yaml"),
    )
    for label, config in dense_tasks:
        extra = ["data.train_scenes=400", "data.test_scenes=100"] if label in ("segmentation", "detection") else []
        dense_run = finetune(str(simclr.run_dir), CONFIGS / config, [*dense, *extra], runs_dir=runs)
        results[label] = fingerprint(dense_run.run_dir)
        results[f"{label}/evaluate"] = fingerprint(evaluate(str(dense_run.run_dir), runs_dir=runs).run_dir)
        results[f"{label}/export"] = exported_metrics(export_run(str(dense_run.run_dir), ["torchscript", "onnx"], runs_dir=runs))
    results.update(modality_chain("audio", "simclr_fsdd.yaml", "finetune10_fsdd.yaml", root, [], runs))
    text = [f"data.tokenizer.path={TEXT_TOKENIZER}"]
    results.update(modality_chain("text", "simclr_ag_news.yaml", "finetune10_ag_news.yaml", root, text, runs))
    return results


def exported_metrics(exported: Any) -> dict[str, Any]:
    return {k: round(v, 9) if isinstance(v, float) else v for k, v in exported.metrics.items()}


def modality_chain(label: str, pretrain_config: str, finetune_config: str, root: list[str], extra: list[str], runs: Path) -> dict[str, Any]:
    """SimCLR pretraining -> k-NN -> a semi-supervised fine-tune -> evaluation -> export, a few steps each."""
    short = ["train.max_steps=12", "train.log_every=4", "data.batch_size=64"]
    source = pretrain(CONFIGS / pretrain_config, [*root, *short, *extra], runs_dir=runs)
    results = {f"{label}/simclr": fingerprint(source.run_dir)}
    results[f"{label}/simclr/knn"] = fingerprint(evaluate(str(source.run_dir), runs_dir=runs).run_dir)
    tuned = finetune(str(source.run_dir), CONFIGS / finetune_config, ["train.max_steps=12", "train.log_every=4"], runs_dir=runs)
    results[f"{label}/finetune10"] = fingerprint(tuned.run_dir)
    results[f"{label}/finetune10/evaluate"] = fingerprint(evaluate(str(tuned.run_dir), runs_dir=runs).run_dir)
    results[f"{label}/finetune10/export"] = exported_metrics(export_run(str(tuned.run_dir), ["torchscript", "onnx"], runs_dir=runs))
    return results


ADDED = "added: "  # a value the earlier fingerprint did not have at all (a metric a later release also reports)


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Every place where `b` differs from `a`; a key only `b` has is reported as ADDED, not as a difference."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in dict.fromkeys([*a, *b]):
            path = f"{where}.{key}" if where else str(key)
            found += differences(a[key], b.get(key), path) if key in a else [f"{ADDED}{path}"]
        return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ["TRANSFERCTL_DATA_DIR"]) if os.environ.get("TRANSFERCTL_DATA_DIR") else None
    )
    parser.add_argument("--out", type=Path, required=True, help="where the fingerprint is written (JSON)")
    parser.add_argument("--compare", type=Path, help="an earlier fingerprint: exit 1 unless every value is identical")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as runs:
        results = chain(args.data_dir, Path(runs))
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print("| run | last.pt weights | best.pt weights | final metrics |")
    print("| --- | --- | --- | --- |")
    for name, result in results.items():
        metrics = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in (result.get("metrics") or result).items())
        print(f"| {name} | {result.get('last_weights', '')} | {result.get('best_weights', '')} | {metrics} |")
    if args.compare:
        every = differences(json.loads(args.compare.read_text()), results)
        added = sorted({re.sub(r"\[\d+\]", "", d.removeprefix(ADDED)).split(".")[-1] for d in every if d.startswith(ADDED)})
        found = [d for d in every if not d.startswith(ADDED)]
        print(f"\n{len(found)} differences from {args.compare}" + "".join(f"\n  {d}" for d in found[:50]))
        if added:
            print(f"added ({sum(d.startswith(ADDED) for d in every)} values the earlier release did not write): {', '.join(added)}")
        sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
