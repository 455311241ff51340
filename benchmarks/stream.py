"""Streamed data at scale: image folders of 10,000, 40,000 and 160,000 JPEG files and their tar shards.

The images are real: MNIST and Fashion-MNIST (train and test, 140,000 images; repeated past that), upscaled to
64 px and written as JPEG, one class folder per digit and garment (20 classes). The smaller folders hold the
first files of the largest (hard links). Each folder is packed into shards with `transferctl data pack`.

For each size and source it runs `transferctl pretrain` (SimCLR, the small cnn, bf16, the default 2 workers) as
a separate process and reports:
- the time from the command's start to its first training step's log line, with a cold cache (the folder
  listed, the statistics measured) and with the manifest cached;
- training images per second over the run, streamed and (where the split fits the memory budget) in memory,
  the median of `--repeats` runs of each, interleaved;
- the peak memory of the whole process tree (the command and its DataLoader workers), as PSS: forked workers
  share pages, which RSS would count once per process.

    python benchmarks/stream.py --data-dir ../shared/data --work /tmp/stream-bench
    python benchmarks/stream.py --data-dir ../shared/data --work /tmp/stream-bench --sizes 2000 --steps 5   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 64


def source_images(data_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every MNIST and Fashion-MNIST image (train and test), shuffled with a fixed seed, and their 20 class names."""
    import torchvision

    images, labels = [], []
    for offset, cls in enumerate((torchvision.datasets.MNIST, torchvision.datasets.FashionMNIST)):
        for train in (True, False):
            ds = cls(root=str(data_dir), train=train, download=False)
            images.append(ds.data.numpy())
            labels.append(ds.targets.numpy() + 10 * offset)
    names = [f"digit_{i}" for i in range(10)] + [f"fashion_{i}" for i in range(10)]
    order = np.random.default_rng(0).permutation(sum(len(x) for x in images))
    return np.concatenate(images)[order], np.concatenate(labels)[order], names


def _write_jpeg(job: tuple[np.ndarray, str]) -> None:
    from PIL import Image

    pixels, path = job
    Image.fromarray(pixels).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).save(path, quality=90)


def make_folders(data_dir: Path, work: Path, sizes: list[int]) -> dict[int, Path]:
    """The largest folder written once (JPEG, two processes), the smaller ones hard-linked from its first files."""
    largest = max(sizes)
    full = work / f"folder-{largest}"
    images, labels, names = source_images(data_dir)
    paths = [full / "train" / names[labels[i % len(images)]] / f"{i:06d}.jpg" for i in range(largest)]
    if not (full / ".complete").exists():
        for name in names:
            (full / "train" / name).mkdir(parents=True, exist_ok=True)
        with Pool(2) as pool:
            pool.map(_write_jpeg, ((images[i % len(images)], str(p)) for i, p in enumerate(paths)), chunksize=512)
        (full / ".complete").touch()
    folders = {largest: full}
    for size in sorted(set(sizes) - {largest}):
        folder = work / f"folder-{size}"
        if not (folder / ".complete").exists():
            shutil.rmtree(folder, ignore_errors=True)
            for name in names:
                (folder / "train" / name).mkdir(parents=True)
            for path in paths[:size]:
                os.link(path, folder / path.relative_to(full))
            (folder / ".complete").touch()
        folders[size] = folder
    return folders


def pack_shards(folder: Path, dest: Path) -> dict:
    if (dest / "manifest.json").exists():
        shutil.rmtree(dest)
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "transferctl", "data", "pack", str(folder), str(dest), "--json"], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    result["wall_s"] = time.perf_counter() - started
    return result


def _tree_pss_mb(root: int) -> float:
    """PSS of `root` and all its descendants, in MB."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


CONFIG = f"""\
method: simclr
model: {{name: cnn}}
data: {{name: image_folder, batch_size: 256, val_fraction: 0.0, image_size: {IMAGE_SIZE}}}
train: {{precision: bf16, device: cpu, log_every: 1}}
"""


def write_config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stream.yaml").write_text(CONFIG)
    return folder / "stream.yaml"


def run_pretrain(data: list[str], steps: int, cache: Path, runs: Path) -> dict:
    """One `transferctl pretrain` process: seconds to its first step's log line, its throughput, peak tree PSS."""
    overrides = [f"train.max_steps={steps}", *data]
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "transferctl", "pretrain", "-c", str(write_config(runs)), *overrides, "--runs-dir", str(runs), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    peak, first_step = [0.0], [None]

    def watch_memory() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], _tree_pss_mb(process.pid))
            time.sleep(0.2)

    def watch_log() -> None:
        for line in process.stderr:
            if first_step[0] is None and line.startswith("step 1/"):
                first_step[0] = time.perf_counter() - started

    threads = [threading.Thread(target=watch_memory, daemon=True), threading.Thread(target=watch_log, daemon=True)]
    for thread in threads:
        thread.start()
    stdout = process.stdout.read()
    process.wait()
    for thread in threads:
        thread.join(timeout=5)
    result = json.loads(stdout)
    if process.returncode != 0:
        raise SystemExit(f"pretrain failed: {result.get('error')}")
    metrics = result["metrics"]
    rate = metrics.get("samples_per_s", metrics.get("images_per_s"))  # transferctl 0.8 and earlier: images_per_s
    return {"first_step_s": first_step[0], "images_per_s": rate, "peak_pss_mb": peak[0]}


def summarized(results: list[dict]) -> dict:
    """Repeated runs: the median first step and throughput, the largest peak memory."""
    middle = lambda key: statistics.median(r[key] for r in results)
    peak = max(r["peak_pss_mb"] for r in results)
    return {"first_step_s": middle("first_step_s"), "images_per_s": middle("images_per_s"), "peak_pss_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="Holds MNIST/ and FashionMNIST/ (torchvision layout).")
    parser.add_argument("--work", type=Path, default=Path("/tmp/transferctl-stream-bench"), help="Where the folders and shards go.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000, 160_000])
    parser.add_argument("--steps", type=int, default=40, help="Training steps of each throughput run (batch 256).")
    parser.add_argument("--sources", nargs="+", choices=["folder", "shards"], default=["folder", "shards"])
    parser.add_argument("--repeats", type=int, default=1, help="Throughput runs per cell (the median is reported).")
    parser.add_argument("--out", type=Path, help="Write the measured cells here as JSON.")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folders = make_folders(args.data_dir, args.work, args.sizes)
    rows = []
    for size in sorted(args.sizes):
        folder, shards = folders[size], args.work / f"shards-{size}"
        packed = pack_shards(folder, shards) if "shards" in args.sources else None
        sources = {
            "folder": ["data.name=image_folder", f"data.root={folder}"],
            "shards": ["data.name=shards", f"data.root={shards}"],
        }
        for source, data in ((k, v) for k, v in sources.items() if k in args.sources):
            cache = args.work / f"cache-{source}-{size}"
            shutil.rmtree(cache, ignore_errors=True)
            cold = run_pretrain([*data, "data.pipeline=stream"], 1, cache, args.work / "runs")
            warm, memory = [], []
            for _ in range(args.repeats):  # interleaved, so a slow spell of this shared machine hits both
                warm.append(run_pretrain([*data, "data.pipeline=stream"], args.steps, cache, args.work / "runs"))
                if source == "folder":
                    memory.append(run_pretrain([*data, "data.pipeline=memory"], args.steps, cache, args.work / "runs"))
            warm, memory = summarized(warm), summarized(memory) if memory else None
            rows.append(
                {
                    "files": size,
                    "source": source,
                    "first_step_cold_s": cold["first_step_s"],
                    "first_step_cached_s": warm["first_step_s"],
                    "stream_images_per_s": warm["images_per_s"],
                    "memory_images_per_s": memory["images_per_s"] if memory else None,
                    "stream_peak_pss_mb": warm["peak_pss_mb"],
                    "memory_peak_pss_mb": memory["peak_pss_mb"] if memory else None,
                    "pack_images_per_s": packed["images_per_s"] if source == "shards" else None,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    print(
        "| files | source | first step, cold cache (s) | first step, manifest cached (s) | stream img/s | memory img/s "
        "| stream / memory | peak PSS stream (MB) | peak PSS memory (MB) | data pack img/s |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["stream_images_per_s"] / r["memory_images_per_s"] if r["memory_images_per_s"] else None
        print(
            f"| {r['files']:,} | {r['source']} | {fmt(r['first_step_cold_s'], '.1f')} | {fmt(r['first_step_cached_s'], '.1f')} "
            f"| {r['stream_images_per_s']:.0f} | {fmt(r['memory_images_per_s'], '.0f')} | {fmt(ratio, '.0%')} "
            f"| {r['stream_peak_pss_mb']:.0f} | {fmt(r['memory_peak_pss_mb'], '.0f')} | {fmt(r['pack_images_per_s'], ',.0f')} |"
        )


if __name__ == "__main__":
    main()
