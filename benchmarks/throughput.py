"""Pretraining throughput of the two batch pipelines, through the same code paths as `transferctl pretrain`.

For each model and pipeline (memory: data on the device, batched augmentation; loader: per-image
torchvision transforms in DataLoader workers), in a fresh subprocess each (so peak memory is its own):
  - data only: images/s of drawing augmented SimCLR view pairs, no model;
  - training: images/s of full steps (two views, forward, NT-Xent, backward, optimizer) after warm-up;
  - data share: data-only time per batch / training time per step (how much of a step the data could cost);
    for audio also the log-mel front end's part of the data path (two views of a batch);
  - peak memory: host RSS (CPU) or CUDA allocator peak (GPU).

    python benchmarks/throughput.py                       # cnn, batch 256, both pipelines
    python benchmarks/throughput.py --models cnn resnet18 --steps 30
    python benchmarks/throughput.py --audio --pipelines memory --models cnn conv1d gru   # FSDD clips ($TRANSFERCTL_DATA_DIR)
    python benchmarks/throughput.py --text --pipelines memory --models gru transformer  # AG News ($TRANSFERCTL_DATA_DIR)

Uses real MNIST when TRANSFERCTL_DATA_DIR points at it, else the MNIST sample shipped in the package.
Prints a markdown table; for text also tokens/s (the non-padding tokens of the articles a step trains on).

`--predict` measures `transferctl predict` instead: inputs/s of predict (decoding in DataLoader workers, the model
on every core beside them) on a folder of MNIST PNGs and on a tar shard of them, FSDD recordings and AG News test
articles, against the model's own forward pass on the same batches (decoded beforehand) on the cores the workers
would leave and on every core; and with `--memory` the memory of predict on 10,000 and 100,000 PNGs:

    python benchmarks/throughput.py --predict                  # $TRANSFERCTL_DATA_DIR: MNIST, FSDD, AG News
    python benchmarks/throughput.py --predict --memory
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measure(
    model: str,
    pipeline: str,
    precision: str,
    batch: int,
    steps: int,
    warmup: int,
    workers: int,
    device: str,
    audio: bool = False,
    text: bool = False,
) -> dict:
    import torch

    from transferctl import allocator, build
    from transferctl.config import load_config

    if audio:
        data, config = "fsdd", REPO / "configs" / "simclr_fsdd.yaml"
    elif text:
        data, config = "ag_news", REPO / "configs" / "simclr_ag_news.yaml"
    else:
        data, config = "mnist" if os.environ.get("TRANSFERCTL_DATA_DIR") else "mnist_sample", REPO / "configs" / "simclr_mnist.yaml"
    overrides = [
        f"model.name={model}",
        f"data.name={data}",
        f"data.batch_size={batch}",
        f"data.pipeline={pipeline}",
        f"data.num_workers={workers}",
        f"train.device={device}",
        f"train.precision={precision}",
    ]
    cfg = load_config(config, overrides)  # another model.name drops the cnn's options
    t = build.build_training(cfg)
    torch.set_num_threads(build.training_threads(cfg, t.pipeline, t.device))  # as `transferctl pretrain` runs it
    if t.device.type == "cpu":
        allocator.keep_freed_memory()  # as training does (with TRANSFERCTL_GLIBC_TUNING=1)
    dev = t.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    total = warmup + steps

    def draw():
        epoch = 0
        while True:
            yield from t.pipeline.batches(epoch)
            epoch += 1

    # data only
    source = draw()
    for _ in range(warmup):
        next(source)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        drawn = next(source)
    sync()
    data_time = (time.perf_counter() - start) / steps
    front_end = {}
    if audio:  # of the data path, what the log-mel front end (part of every export) costs: two views a batch
        clips = torch.randn(batch, t.train.clip_samples, device=dev) * 0.1
        with torch.no_grad():
            t.modality.normalize(clips, t.train)
            sync()
            start = time.perf_counter()
            for _ in range(2 * steps):
                t.modality.normalize(clips, t.train)
            sync()
        front_end = {"data_ms": data_time * 1000, "front_end_ms": (time.perf_counter() - start) / steps * 1000}

    # training
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t.network.train()
    source = draw()
    for i in range(total):
        if i == warmup:
            sync()
            start = time.perf_counter()
        drawn = next(source)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = t.objective.loss(drawn, i)
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t.optimizer.step()
    loss.item()
    sync()
    step_time = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = {}
    if text:  # the real (non-padding) tokens of an average article
        per_text = (t.train.inputs != t.train.tokenization.pad_id).sum(dim=1).float().mean().item()
        tokens = {"train_tokens_per_s": batch / step_time * per_text, "tokens_per_text": per_text}
    return {
        "model": model,
        "precision": precision,
        "pipeline": type(t.pipeline).__name__.removesuffix("Pipeline").lower(),
        "device": str(dev),
        "data": data,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "workers": workers if pipeline == "loader" else 0,
        "data_images_per_s": batch / data_time,
        "train_images_per_s": batch / step_time,
        "data_share": data_time / step_time,
        "peak_mb": peak,
        **tokens,
        **front_end,
    }


# --------------------------------------------------------------------------- predict


def _trained_run(work: Path, kind: str) -> Path:
    """A run to predict with: one training step of the shipped config (speed does not depend on the weights)."""
    from transferctl import recipes

    configs = {"image": "supervised_mnist.yaml", "audio": "supervised_fsdd.yaml", "text": "supervised_ag_news.yaml"}
    data = {"image": ["data.name=mnist" if os.environ.get("TRANSFERCTL_DATA_DIR") else "data.name=mnist_sample"]}.get(kind, [])
    overrides = [*data, "train.max_steps=1", "train.epochs=1", "train.device=cpu", "train.val_every=1000"]
    return recipes.pretrain(REPO / "configs" / configs[kind], overrides, runs_dir=work / "runs").run_dir


def _mnist_pngs(folder: Path, count: int) -> list[Path]:
    """`count` MNIST digits as PNG files (the test split's, repeated as needed), and a tar shard of the first 10,000."""
    import numpy as np
    from PIL import Image

    from transferctl.config import load_config
    from transferctl.data import load_split

    name = "mnist" if os.environ.get("TRANSFERCTL_DATA_DIR") else "mnist_sample"
    digits = load_split(load_config(None, base={"method": "supervised", "data": {"name": name}}).data, train=False).inputs[:, 0].numpy()
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i // 1000:03d}" / f"{i:06d}.png" for i in range(count)]
    for i, path in enumerate(paths):
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(np.ascontiguousarray(digits[i % len(digits)])).save(path)
    return paths


def predict_cell(run: str, inputs: list[str], batch: int, forward: bool, rounds: int = 5) -> dict:
    """One measurement, in its own process: predict's inputs/s end to end (records made; the model loaded and one
    batch predicted beforehand) and its peak memory; with `forward`, the model's forward pass on the same batches
    decoded beforehand, on the cores the workers leave and on every core. Best of `rounds`, taken in turn (a shared
    machine's noise only ever slows a round down)."""
    import torch

    from transferctl.recipes.prediction import default_workers, prepare_predict, read_batches

    prepared = prepare_predict(run, [Path(i) for i in inputs], batch_size=batch, runs_dir=Path(run).parent)
    count = len(prepared.inputs)
    workers = default_workers(prepared.model.modality, -(-count // batch))
    every, threads = prepared.inputs, torch.get_num_threads()  # predict's: every core
    prepared.inputs = every[:batch]
    sum(1 for _ in prepared.records())  # warm-up, as the forward pass gets one: one-time costs paid
    prepared.inputs = every
    batches = [b for _, b, _ in read_batches(prepared.model, every, batch, workers=0)] if forward else []
    cores = os.cpu_count() or 1
    passes = {"forward_same_threads": max(1, cores - workers), "forward_all_threads": cores}
    best: dict[str, float] = {}
    streaming = [_resident_mb()]  # resident memory after each batch: what streaming keeps, whatever came before
    for _ in range(rounds if forward else 1):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        assert sum(1 for _ in prepared.records(lambda done, total: streaming.append(_resident_mb()))) == count
        best["predict_per_s"] = max(best.get("predict_per_s", 0.0), count / (time.perf_counter() - start))
        for name, used in passes.items() if forward else ():
            torch.set_num_threads(used)
            prepared.model.run(batches[0])  # warm-up at this thread count
            start = time.perf_counter()
            for read in batches:
                prepared.model.run(read)
            best[name] = max(best.get(name, 0.0), count / (time.perf_counter() - start))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # with forward: the decoded batches too
    threads_used = {name.replace("forward", "threads"): used for name, used in passes.items()}
    return {"inputs": count, "workers": workers, "peak_mb": peak_mb, "streaming_mb": statistics.median(streaming), **best, **threads_used}


def _resident_mb() -> float:
    """This process's resident memory now (Linux): sampled while predicting, what a start-up peak cannot hide."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return float("nan")
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024


def _predict_cells(work: Path, args: argparse.Namespace) -> list[dict]:
    import tarfile

    cells = []

    def measure_one(label: str, modality: str, run: Path, inputs: list[str], batch: int, forward: bool = True) -> None:
        command = [sys.executable, __file__, "--predict-cell", json.dumps([str(run), inputs, batch, forward])]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        cells.append({"label": label, "modality": modality, "batch": batch, **json.loads(out.strip().splitlines()[-1])})
        print(f"measured {label}", file=sys.stderr)

    image_run = _trained_run(work, "image")
    if args.memory:
        _mnist_pngs(work / "pngs", 100_000)  # in folders of 1,000: 000 to 099
        for count, pattern in ((10_000, "00?"), (100_000, "*")):
            measure_one(f"{count:,} MNIST PNGs", "image", image_run, [str(work / "pngs" / pattern)], args.batch, forward=False)
        return cells
    pngs = _mnist_pngs(work / "pngs", args.predict_images)
    shard = work / "mnist-000000.tar"
    if not shard.exists():
        with tarfile.open(shard, "w") as tar:
            for i, path in enumerate(pngs):
                tar.add(path, arcname=f"{i:06d}.png")
    measure_one(f"{len(pngs):,} MNIST PNGs in a folder", "image", image_run, [str(work / "pngs")], args.batch)
    measure_one(f"{len(pngs):,} MNIST PNGs in a tar shard", "image", image_run, [str(shard)], args.batch)
    data = Path(os.environ.get("TRANSFERCTL_DATA_DIR", ""))
    if (data / "FSDD").is_dir():
        measure_one("3,000 FSDD recordings", "audio", _trained_run(work, "audio"), [str(data / "FSDD")], args.batch)
    if (data / "AGNews" / "test.csv").is_file():
        measure_one("7,600 AG News test articles", "text", _trained_run(work, "text"), [str(data / "AGNews" / "test.csv")], args.batch)
    return cells


def predict_main(args: argparse.Namespace) -> None:
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="transferctl-predict-"))
    cells = _predict_cells(work, args)
    if args.memory:
        print("| inputs | batch | workers | predict (img/s) | peak memory (MB) | resident while predicting, median of the batches (MB) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for c in cells:
            print(
                f"| {c['label']} | {c['batch']} | {c['workers']} | {c['predict_per_s']:,.0f} | {c['peak_mb']:,.0f} | "
                f"{c['streaming_mb']:,.0f} |"
            )
        first, last = cells[0], cells[-1]
        change = {k: f"{last[k] / first[k] - 1:+.1%}" for k in ("peak_mb", "streaming_mb")}
        print(f"\n100,000 inputs against 10,000: peak memory {change['peak_mb']}, while predicting {change['streaming_mb']}", end="")
        print(f" ({os.cpu_count()} CPU cores; the main process: decoding workers are forked and end with the run)")
        return
    print("| inputs | batch | workers | predict (/s) | forward, cores the workers leave (/s) | share | forward, every core (/s) | share |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in cells:
        same, every = c["forward_same_threads"], c["forward_all_threads"]
        print(
            f"| {c['label']} | {c['batch']} | {c['workers']} | {c['predict_per_s']:,.0f} | {same:,.0f} ({c['threads_same_threads']}) | "
            f"{c['predict_per_s'] / same:.0%} | {every:,.0f} ({c['threads_all_threads']}) | {c['predict_per_s'] / every:.0%} |"
        )
    print(f"\n({os.cpu_count()} CPU cores; the model: one step of configs/supervised_*.yaml; work folder {work})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cnn"])
    parser.add_argument("--pipelines", nargs="+", default=["memory", "loader"])
    parser.add_argument("--precisions", nargs="+", default=["32", "bf16"], choices=["32", "bf16"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the loader pipeline")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--audio", action="store_true", help="FSDD clips through configs/simclr_fsdd.yaml (memory pipeline only)")
    parser.add_argument("--text", action="store_true", help="AG News articles through configs/simclr_ag_news.yaml (memory pipeline only)")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "PIPELINE", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--predict", action="store_true", help="measure `transferctl predict` (see above)")
    parser.add_argument("--memory", action="store_true", help="with --predict: peak memory on 10,000 and 100,000 PNGs")
    parser.add_argument("--predict-images", type=int, default=10_000, help="with --predict: PNGs in the folder and shard")
    parser.add_argument("--work", help="with --predict: a folder to keep the PNGs and runs in (default: a new temporary one)")
    parser.add_argument("--predict-cell", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.predict_cell:
        print(json.dumps(predict_cell(*json.loads(args.predict_cell))))
        return
    if args.predict:
        predict_main(args)
        return
    if args.one:
        print(json.dumps(measure(*args.one, args.batch, args.steps, args.warmup, args.workers, args.device, args.audio, args.text)))
        return

    rows = []
    for model, precision, pipeline in itertools.product(args.models, args.precisions, args.pipelines):
        command = [
            sys.executable,
            __file__,
            "--one",
            model,
            pipeline,
            precision,
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--workers",
            str(args.workers),
            "--device",
            args.device,
            *(["--audio"] if args.audio else []),
            *(["--text"] if args.text else []),
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"measured {model}/{pipeline}/{precision}", file=sys.stderr)
    columns = ["model", "precision", "pipeline", "device", "batch", "threads", "workers", "data only (img/s)", "training (img/s)"]
    print("| " + " | ".join([*columns, "data share of a step", "peak memory (MB)"]) + " |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['model']} | {r['precision']} | {r['pipeline']} | {r['device']} | {r['batch']} | {r['threads']} | {r['workers']} | "
            f"{r['data_images_per_s']:,.0f} | {r['train_images_per_s']:,.0f} | {r['data_share']:.1%} | {r['peak_mb']:,.0f} |"
        )
    for r in rows:
        if "train_tokens_per_s" in r:
            print(f"{r['model']}, {r['precision']}: {r['train_tokens_per_s']:,.0f} tokens/s ({r['tokens_per_text']:.1f} tokens an article)")
        if "front_end_ms" in r:
            shares = f"the data path takes {r['data_ms']:.0f} ms a batch, the front end {r['front_end_ms']:.0f} ms of it"
            print(f"{r['model']}, {r['precision']}: {shares}")
    print()
    for model, precision in itertools.product(args.models, args.precisions):
        by = {r["pipeline"]: r for r in rows if (r["model"], r["precision"]) == (model, precision)}
        if {"memory", "loader"} <= by.keys():
            speedup = by["memory"]["train_images_per_s"] / by["loader"]["train_images_per_s"]
            ratio = by["memory"]["data_images_per_s"] / by["memory"]["train_images_per_s"]
            print(f"{model}, {precision}: memory trains {speedup:.2f}x the loader's images/s;", end=" ")
            print(f"its data path runs {ratio:.1f}x the training rate")
    print(f"\n(data: {rows[0]['data']}; {os.cpu_count()} CPU cores)")


if __name__ == "__main__":
    main()
