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
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
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
    args = parser.parse_args()
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
