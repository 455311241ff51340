"""The cost of one fine-tuning step of each public family's smallest member, with and without LoRA, on this machine.

Each model is built at its real size with random weights (no download: the architecture is what costs), saved as the
hub holds it and loaded through transferctl's `timm` or `hf` model exactly as a run loads it (the run's config
resolved, the encoder built from the registry, LoRA's adapters added as `finetune.lora` adds them); a linear head on
its pooled features; AdamW. One step = forward, cross-entropy, backward and the optimizer's update of a batch already
in memory (decoding and augmentation not counted). Prints a markdown table of inputs/s and trained parameters.

    python benchmarks/zoo_steps.py                    # every family, batch 8
    python benchmarks/zoo_steps.py --families convnext_atto bert-tiny --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

# family -> (what builds its checkpoint folder, transferctl's model name, data set whose modality it reads, input)
FAMILIES = ("convnext_atto", "vit_tiny_patch16_224", "hf-vit-small", "bert-tiny", "distilbert", "wav2vec2-base")


def save_checkpoint(family: str, folder: Path) -> tuple[str, str, dict]:
    """A random checkpoint of `family` in `folder`; (model name, data set, what the encoder is built with)."""
    if family in ("convnext_atto", "vit_tiny_patch16_224"):
        import timm
        from timm.models import _hub

        _hub.save_for_hf(timm.create_model(family, num_classes=1000), folder, safe_serialization=True)
        return "timm", "mnist", {"in_channels": 3}
    import transformers as t

    if family == "hf-vit-small":  # DINOv2-small's shape (ViT-S/14), at 224 px
        model = t.Dinov2Model(t.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=224, patch_size=14))
        t.BitImageProcessor(size={"height": 224, "width": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
        model.save_pretrained(folder)
        return "hf", "mnist", {}
    if family == "bert-tiny":  # google/bert_uncased_L-2_H-128_A-2
        config = t.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)
        t.BertModel(config, add_pooling_layer=False).save_pretrained(folder)
        return "hf", "text_csv", {"vocab_size": config.vocab_size, "pad_id": 0, "max_length": 128}
    if family == "distilbert":
        config = t.DistilBertConfig()
        t.DistilBertModel(config).save_pretrained(folder)
        return "hf", "text_csv", {"vocab_size": config.vocab_size, "pad_id": 0, "max_length": 128}
    if family == "wav2vec2-base":
        t.Wav2Vec2Model(t.Wav2Vec2Config()).save_pretrained(folder)
        t.Wav2Vec2FeatureExtractor().save_pretrained(folder)
        return "hf", "fsdd", {}
    raise SystemExit(f"unknown family {family}; choose from {', '.join(FAMILIES)}")


def example_batch(data: str, batch: int, context: dict) -> tuple[torch.Tensor, str]:
    if data == "mnist":
        return torch.randn(batch, 3, 224, 224), "images/s"
    if data == "fsdd":
        return torch.randn(batch, 16000), "clips/s (1 s)"
    return torch.randint(1000, context["vocab_size"], (batch, context["max_length"])), "texts/s (128 tokens)"


def measure(family: str, lora_rank: int | None, batch: int, steps: int) -> dict:
    from transferctl.build import build_encoder, build_optimizer, parameter_groups
    from transferctl.config import load_config
    from transferctl.models import Network, lora

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / family
        name, data, context = save_checkpoint(family, folder)
        model = {"name": name, "weights": str(folder)}
        base = {"method": "finetune", "model": model, "data": {"name": data}, "optimizer": {"name": "adamw"}}
        if lora_rank:  # ConvNeXt-Atto's MLPs are 1x1 convolutions: no linear layer for all-linear to find
            targets = ["fc1", "fc2"] if family == "convnext_atto" else "all-linear"
            base["finetune"] = {"lora": {"r": lora_rank, "target_modules": targets}}
        cfg = load_config(None, base=base, command="finetune")
        encoder = build_encoder(cfg, context)
    network = Network(encoder, nn.Linear(encoder.feature_dim, 10), "features")
    if lora_rank:
        lora.add_adapters(network.encoder, cfg.finetune.lora)
    optimizer = build_optimizer(cfg, parameter_groups(network, 1.0))
    inputs, unit = example_batch(data, batch, context)
    targets = torch.randint(0, 10, (batch,))
    times = []
    network.train()
    for step in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(network(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= 2:
            times.append(time.perf_counter() - start)
    counts = network.parameter_counts()
    rate = batch / statistics.median(times)
    return {"family": family, "lora": f"r={lora_rank}" if lora_rank else "no", "rate": rate, "unit": unit, **counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lora-rank", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [measure(f, rank, args.batch, args.steps) for f in args.families for rank in (None, args.lora_rank)]
    print(f"| family | LoRA | inputs/s (batch {args.batch}, one training step) | trained parameters | of |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['lora']} | {r['rate']:.1f} {r['unit']} | {r['trained']:,} | {r['total']:,} |")
    print(f"\n{torch.get_num_threads()} threads, torch {torch.__version__}")


if __name__ == "__main__":
    main()
