"""Starting from public models: timm and Hugging Face image and speech checkpoints (tiny and random, saved as a download
would be), hub ids read from the local cache, LoRA and layer-wise learning-rate decay. Text families: test_zoo_text.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file
from timm.models import _hub as timm_hub

from tests.conftest import make_mnist_root, save_tiny_wav2vec2
from tests.test_audio import make_fsdd

CHECKPOINT_SEED = 1234  # not the runs' seed: a fresh encoder must not happen to hold the checkpoint's weights
VIT_ARGS = dict(depth=2, embed_dim=32, num_heads=2, img_size=32, patch_size=8)


def _ok(result):
    assert result.code == 0, result.stderr
    return result.json


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """Tiny random checkpoints as the hub holds them: timm ViT and ConvNeXt folders (config.json with pretrained_cfg,
    model.safetensors), a Hugging Face ViT with its image processor and a wav2vec 2.0 with its feature extractor."""
    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(CHECKPOINT_SEED)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=7, **VIT_ARGS)
    timm_hub.save_for_hf(vit, root / "timm-vit", model_args=VIT_ARGS, safe_serialization=True)
    convnext_args = dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))
    convnext = timm.create_model("convnext_atto", num_classes=7, **convnext_args)
    timm_hub.save_for_hf(convnext, root / "timm-convnext", model_args=convnext_args, safe_serialization=True)
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(root / "hf-vit")
    transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25]
    ).save_pretrained(root / "hf-vit")
    dinov2 = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    transformers.Dinov2Model(dinov2).save_pretrained(root / "hf-dinov2")
    transformers.BitImageProcessor(  # DINOv2's: bicubic, the shorter side to 256 then the centre 224 (here 40 and 32)
        size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, resample=3, image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225], do_convert_rgb=True,
    ).save_pretrained(root / "hf-dinov2")  # fmt: skip
    save_tiny_wav2vec2(root / "hf-wav2vec2")
    return {p.name: p for p in root.iterdir()}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return make_mnist_root(tmp_path_factory.mktemp("digits"), 200, 60)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> Path:
    return make_fsdd(tmp_path_factory.mktemp("fsdd"), takes=6)


def training_of(model: dict, data: dict, **sections):
    from transferctl.build import build_training
    from transferctl.config import load_config

    base = {"method": "finetune", "model": model, "data": {"labels_per_class": 2, **data}, "train": {"max_steps": 1}, **sections}
    return build_training(load_config(None, base=base, command="finetune"))


def _image_folder(root: Path, shapes: tuple[tuple[int, int], ...]) -> Path:
    """Random RGB photos of these (height, width) shapes, one class each, two per class in train/ and test/."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label, shape in zip("abcd", shapes, strict=False):
            (root / split / label).mkdir(parents=True)
            for index in range(2):
                Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(root / split / label / f"{index}.png")
    return root


# --------------------------------------------------------------------------- faithful loading


@pytest.mark.parametrize("folder", ["timm-vit", "timm-convnext"])
def test_a_timm_encoder_gives_the_checkpoints_pre_logits_and_its_normalization(zoo, digits, folder):
    reference = timm.create_model(f"local-dir:{zoo[folder]}", pretrained=True).eval()
    training = training_of({"name": "timm", "weights": str(zoo[folder])}, {"name": "mnist", "root": str(digits)})
    encoder = training.network.encoder.eval()
    size = reference.pretrained_cfg["input_size"][-1]
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), reference.forward_head(reference.forward_features(x), pre_logits=True), atol=1e-5, rtol=0)
        grey = torch.randn(3, 1, size, size)  # a grey image is the three-channel image of three equal channels
        torch.testing.assert_close(encoder(grey), encoder(grey.expand(-1, 3, -1, -1)))
        maps = encoder.feature_maps(x)
    assert [m.shape[1] for m in maps] == list(encoder.stage_channels) and len(maps) >= 2
    # the weights' statistics normalize the run's images, not the digits' own; the run's config records them
    assert training.train.mean == tuple(reference.pretrained_cfg["mean"]) and training.val.std == tuple(reference.pretrained_cfg["std"])
    assert training.cfg.model.options["pretrained_cfg"]["mean"] == list(reference.pretrained_cfg["mean"])


def test_a_timm_checkpoint_reads_image_files_as_its_evaluation_transform_does(zoo, tmp_path):
    """From files to features through an image folder: timm's eval transform (bicubic, shorter side to 224 / 0.875,
    the centre 224 kept), three channels, the checkpoint's normalization."""
    from timm.data import create_transform, resolve_data_config

    from transferctl.modalities import modality_named

    root = _image_folder(tmp_path, ((224, 224), (300, 250)))  # one at the checkpoint's size, one not square
    training = training_of(
        {"name": "timm", "weights": str(zoo["timm-convnext"])}, {"name": "image_folder", "root": str(root), "labels_per_class": None}
    )
    assert {k: training.cfg.data.options[k] for k in ("image_size", "interpolation", "crop_fraction")} == {
        "image_size": 224, "interpolation": "bicubic", "crop_fraction": 0.875,
    }  # fmt: skip
    reference = timm.create_model(f"local-dir:{zoo['timm-convnext']}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config(model=reference))
    files = sorted((root / "test").rglob("*.png"))
    read = modality_named("image").read(files, training.modality.fitted_state(training.train))
    with torch.no_grad():
        ours = training.network.encoder.eval()(training.modality.model_input(read.inputs, read))
        pixels = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
        theirs = reference.forward_head(reference.forward_features(pixels), pre_logits=True)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_a_hugging_face_image_checkpoint_reads_files_as_its_image_processor_does(zoo, tmp_path):
    """DINOv2's processor: bicubic, the shorter side to 40, the centre 32 kept, its mean and std; the pooled output."""
    from transferctl.modalities import modality_named

    folder = zoo["hf-dinov2"]
    root = _image_folder(tmp_path, ((32, 32), (50, 41)))
    training = training_of({"name": "hf", "weights": str(folder)}, {"name": "image_folder", "root": str(root), "labels_per_class": None})
    assert training.cfg.data.options["crop_fraction"] == 0.8 and training.cfg.data.options["interpolation"] == "bicubic"
    files = sorted((root / "test").rglob("*.png"))
    read = modality_named("image").read(files, training.modality.fitted_state(training.train))
    # the PIL processor, as transformers 4 resized (its version 5's torchvision backend rounds some pixels one level apart)
    processor = transformers.BitImageProcessorPil.from_pretrained(str(folder))
    reference = transformers.AutoModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        ours = training.network.encoder.eval()(training.modality.model_input(read.inputs, read))
        pixels = processor(images=[Image.open(f) for f in files], return_tensors="pt")["pixel_values"]
        theirs = reference(pixel_values=pixels).pooler_output
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def _tiny_vision(family: str):
    t = transformers
    small = dict(num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    if family == "vit":
        return t.ViTModel(t.ViTConfig(hidden_size=32, intermediate_size=64, **small), add_pooling_layer=False)
    if family == "dinov2":
        return t.Dinov2Model(t.Dinov2Config(hidden_size=32, **small))
    if family == "convnext":
        return t.ConvNextModel(t.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]))
    return t.SwinModel(t.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4))


def _tiny_speech(family: str):
    t = transformers
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
                 conv_stride=(10, 8), conv_kernel=(10, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)  # fmt: skip
    config = {"wav2vec2": t.Wav2Vec2Config, "hubert": t.HubertConfig, "wavlm": t.WavLMConfig}[family](**small)
    return {"wav2vec2": t.Wav2Vec2Model, "hubert": t.HubertModel, "wavlm": t.WavLMModel}[family](config)


@pytest.mark.parametrize("family", ["vit", "dinov2", "convnext", "swin", "wav2vec2", "hubert", "wavlm"])
def test_every_hugging_face_image_and_speech_family_gives_its_automodels_features(digits, recordings, tmp_path, family):
    """Pooled features on the same input tensor: the model's own pooled output (DINOv2, ConvNeXt), [CLS] (ViT), the
    mean over patches (Swin) or over real frames (speech)."""
    torch.manual_seed(CHECKPOINT_SEED)
    speech = family in ("wav2vec2", "hubert", "wavlm")
    (_tiny_speech if speech else _tiny_vision)(family).save_pretrained(tmp_path / family)
    data = {"name": "fsdd", "root": str(recordings)} if speech else {"name": "mnist", "root": str(digits)}
    encoder = training_of({"name": "hf", "weights": str(tmp_path / family)}, data).network.encoder.eval()
    reference = transformers.AutoModel.from_pretrained(str(tmp_path / family)).eval()
    x = torch.randn(2, 4000) if speech else torch.randn(2, 3, reference.config.image_size, reference.config.image_size)
    with torch.no_grad():
        ours = encoder(x, torch.tensor([4000, 4000])) if speech else encoder(x)
        out = reference(input_values=x) if speech else reference(pixel_values=x)
    pooled = {"vit": out.last_hidden_state[:, 0], "swin": out.last_hidden_state.mean(1)}.get(family)
    if speech:
        pooled = out.last_hidden_state.mean(1)
    torch.testing.assert_close(ours, pooled if pooled is not None else out.pooler_output, atol=1e-5, rtol=0)
    if not speech:  # stage maps for dense heads: the model's own hidden states, patches laid out on their grid
        with torch.no_grad():
            maps = encoder.feature_maps(x)
            states = reference(pixel_values=x, output_hidden_states=True)
        assert [m.shape[1] for m in maps] == list(encoder.stage_channels) and all(m.dim() == 4 for m in maps)
        deepest = getattr(states, "reshaped_hidden_states", None) or states.hidden_states
        if family == "convnext":
            torch.testing.assert_close(maps[-1], deepest[-1], atol=1e-5, rtol=0)


def test_a_speech_checkpoint_gives_its_frame_features_on_waveforms_at_its_rate(zoo, recordings):
    reference = transformers.AutoModel.from_pretrained(str(zoo["hf-wav2vec2"])).eval()
    training = training_of({"name": "hf", "weights": str(zoo["hf-wav2vec2"])}, {"name": "fsdd", "root": str(recordings)})
    assert training.cfg.data.options["sample_rate"] == 16000 and training.cfg.data.options["front_end"] == "waveform"
    assert training.train.sample_shape == (16000,)  # FSDD's 8 kHz recordings resampled once, as they are read
    x, lengths = torch.randn(2, 8000), torch.tensor([8000, 5000])
    x[1, 5000:] = 0
    encoder = training.network.encoder.eval()
    with torch.no_grad():
        steps, mask = encoder.token_features(x, lengths)
        theirs = reference(input_values=x, attention_mask=(torch.arange(8000) < lengths[:, None]).long()).last_hidden_state
    torch.testing.assert_close(steps, theirs, atol=1e-5, rtol=0)
    assert mask.sum(1).tolist() == reference._get_feat_extract_output_lengths(lengths).tolist()


# --------------------------------------------------------------------------- chains


CHAINS = [  # (model, its checkpoint, data set, export format); a timm ViT's ONNX export: the LoRA test's
    ("timm", "timm-convnext", "mnist", "torchscript"),
    ("hf", "hf-vit", "mnist", "torchscript"),
    ("hf", "hf-wav2vec2", "fsdd", "onnx"),
]


@pytest.mark.parametrize(("name", "folder", "data", "export_format"), CHAINS)
def test_a_public_checkpoint_fine_tunes_evaluates_predicts_and_exports_without_its_folder(
    cli, zoo, digits, recordings, tmp_path, name, folder, data, export_format
):
    copy = shutil.copytree(zoo[folder], tmp_path / folder)
    root = digits if data == "mnist" else recordings
    recipe = Path(__file__).parent.parent / "configs" / f"finetune10_{data}.yaml"
    overrides = [f"model.name={name}", f"model.weights={copy}", f"data.root={root}", "data.labels_per_class=2", "train.max_steps=2"]
    overrides += ["finetune.unlabeled.weight=0"] + (["model.input_size=32"] if name == "timm" else [])
    tuned = _ok(cli("finetune", "-c", str(recipe), *overrides, "--json"))
    shutil.rmtree(copy)  # the run rebuilds its encoder and reads its data without the folder, also to resume
    assert _ok(cli("finetune", "--resume", tuned["run_dir"], "train.max_steps=3", "--json"))["status"] == "completed"
    assert _ok(cli("evaluate", "--from", tuned["run_dir"], "--json"))["metrics"]["accuracy"] >= 0
    exported = _ok(cli("export", "--from", tuned["run_dir"], "--format", export_format, "--json"))
    assert exported["parity"][export_format]["passed"], exported["parity"]
    if data == "mnist":
        inputs = [tmp_path / f"{index}.png" for index in range(2)]
        for index, path in enumerate(inputs):
            Image.fromarray(np.full((28, 28), 40 * index, dtype=np.uint8)).save(path)
    else:
        inputs = sorted((root / "FSDD").rglob("*.wav"))[:2]
    predicted = _ok(cli("predict", "--from", tuned["run_dir"], *map(str, inputs), "--output", str(tmp_path / "p.jsonl"), "--json"))
    assert predicted["predicted"] == 2


# --------------------------------------------------------------------------- hub ids and bad input


def _cache_of(folder: Path, cache: Path, repo: str) -> None:
    """`folder` as huggingface_hub's cache holds a download of `repo`: blobs, a snapshot, refs/main."""
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)


def test_a_hub_id_loads_from_the_local_cache_and_offline_a_missing_one_is_one_line(cli, zoo, digits, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    _cache_of(zoo["timm-vit"], cache, "timm/tiny-vit")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    training = training_of({"name": "timm", "weights": "hf-hub:timm/tiny-vit"}, {"name": "mnist", "root": str(digits)})
    assert training.cfg.model.weights == "hf-hub:timm/tiny-vit" and training.cfg.model.options["arch"] == "vit_tiny_patch16_224"
    reference = timm.create_model(f"local-dir:{zoo['timm-vit']}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            training.network.encoder.eval()(x), reference.forward_head(reference.forward_features(x), pre_logits=True)
        )
    runs = tmp_path / "runs"
    recipe = Path(__file__).parent.parent / "configs" / "finetune10_mnist.yaml"
    missing = cli(
        "finetune",
        "-c",
        str(recipe),
        "model.name=timm",
        "model.weights=hf-hub:timm/not-cached",
        f"data.root={digits}",
        "--runs-dir",
        str(runs),
    )
    assert missing.code == 2 and "hf-hub:timm/not-cached" in missing.stderr and "local folder" in missing.stderr, missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and "Traceback" not in missing.stderr and not runs.exists()
    default_args = ["model.name=timm", "model.arch=convnext_atto", "model.weights=DEFAULT", f"data.root={digits}"]
    default = cli("finetune", "-c", str(recipe), *default_args, "--runs-dir", str(runs))
    assert default.code == 2 and "hf-hub:timm/convnext_atto.d2_in1k" in default.stderr, default.stderr
    assert "HF_HUB_OFFLINE" in default.stderr
    assert len(default.stderr.strip().splitlines()) == 1 and not runs.exists()


def test_a_speech_checkpoint_learns_to_transcribe_with_ctc_over_its_own_frames(cli, zoo, tmp_path):
    """CTC aligns each transcript to the encoder's frames (one per 80 samples here, per 320 in wav2vec 2.0 base), not to
    the samples it reads; the recognizer exports with the frames past each recording's end blank."""
    from tests.test_speech_recognition import SPEAKERS, digit_take, write_wav

    for digit in range(3):
        for s, speaker in enumerate(SPEAKERS):
            for take in range(6):
                write_wav(tmp_path / "FSDD" / "recordings" / f"{digit}_{speaker}_{take}.wav", digit_take(digit, s, take))
    recipe = Path(__file__).parent.parent / "configs" / "asr_fsdd_sequences.yaml"
    args = ["model.name=hf", f"model.weights={zoo['hf-wav2vec2']}", f"data.root={tmp_path}", "train.max_steps=2", "train.precision=32"]
    args += ["data.train_utterances=40", "data.test_utterances=8", "data.max_digits=3", "data.batch_size=8"]
    tuned = _ok(cli("finetune", "-c", str(recipe), *args, "--json"))
    assert tuned["metrics"]["val_wer"] >= 0
    exported = _ok(cli("export", "--from", tuned["run_dir"], "--format", "torchscript", "--json"))  # ONNX: the chains' test
    assert exported["parity"]["torchscript"]["passed"], exported["parity"]


def test_weights_of_another_shape_or_modality_are_one_line(cli, zoo, digits, recordings, tmp_path):
    recipe = Path(__file__).parent.parent / "configs" / "finetune10_mnist.yaml"
    torch.save(load_file(str(zoo["timm-vit"] / "model.safetensors")), tmp_path / "vit.pth")  # a ViT's weights for a ConvNeXt
    wrong = cli("finetune", "-c", str(recipe), "model.name=timm", "model.arch=convnext_atto", f"model.weights={tmp_path / 'vit.pth'}",
                "model.input_size=32", f"data.root={digits}", "train.max_steps=1")  # fmt: skip
    assert wrong.code == 2 and "missing keys (first: model.stem.0.weight)" in wrong.stderr, wrong.stderr
    fixed_size = cli("finetune", "-c", str(recipe), "model.name=timm", f"model.weights={zoo['timm-vit']}", "model.input_size=48",
                     f"data.root={digits}")  # fmt: skip
    assert fixed_size.code == 2 and "takes 32x32 images" in fixed_size.stderr, fixed_size.stderr
    speech_on_images = cli("finetune", "-c", str(recipe), "model.name=hf", f"model.weights={zoo['hf-wav2vec2']}", f"data.root={digits}")
    assert speech_on_images.code == 2 and "reads audio data, and data set 'mnist' holds image data" in speech_on_images.stderr
    assert len(speech_on_images.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- LoRA and layer decay


def test_lora_trains_only_the_adapters_and_the_head_and_every_reader_merges_them(cli, zoo, digits, tmp_path):
    from transferctl import checkpoints
    from transferctl.build import build_network, rebuild
    from transferctl.config import load_config
    from transferctl.models import lora

    recipe = Path(__file__).parent.parent / "configs" / "finetune10_mnist.yaml"
    args = ["model.name=timm", f"model.weights={zoo['timm-vit']}", f"data.root={digits}", "data.labels_per_class=2", "train.max_steps=3"]
    args += ["finetune.unlabeled.weight=0", "finetune.head_warmup_steps=0", "finetune.lora.r=4", "optimizer.lr=0.05"]
    tuned = _ok(cli("finetune", "-c", str(recipe), *args, "--json"))
    run = Path(tuned["run_dir"])
    summary = json.loads((run / "summary.json").read_text())
    saved = checkpoints.read(run / "checkpoints" / "last.pt")
    start = {f"encoder.model.{k}": v for k, v in load_file(str(zoo["timm-vit"] / "model.safetensors")).items()}
    adapters = [k for k in saved.model if ".lora_" in k]
    assert adapters and all(".lora_A.default." in k or ".lora_B.default." in k for k in adapters)
    for key, value in saved.model.items():  # the encoder's own weights are where they started
        plain = key.replace(".base_layer.", ".")
        if key.startswith("encoder.") and ".lora_" not in key:
            torch.testing.assert_close(value, start[plain], rtol=0, atol=0)
    assert any(saved.model[k].abs().sum() > 0 for k in adapters if ".lora_B." in k)  # B starts at zero and trained
    # the merged network (what evaluate, predict and export read) computes what the unmerged one does
    cfg = load_config(None, base=saved.config)
    merged = rebuild(saved, cfg)
    lora_params, head_params = sum(saved.model[k].numel() for k in adapters), sum(p.numel() for p in merged.head.parameters())
    assert summary["parameters"]["trained"] == lora_params + head_params < summary["parameters"]["total"]
    assert not any(".lora_" in k for k in merged.state_dict())
    unmerged = build_network(cfg, (1, 28, 28), 10, saved.data)
    lora.add_adapters(unmerged.encoder, cfg.finetune.lora)
    unmerged.load_state_dict(saved.model)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), unmerged.eval()(x), atol=1e-5, rtol=1e-5)
    exported = _ok(cli("export", "--from", str(run), "--format", "onnx", "--json"))
    assert exported["parity"]["onnx"]["passed"]
    card = json.loads((run / "export" / "model_card.json").read_text())  # the card says what the encoder started from
    assert card["model_options"]["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5] and card["model_weights"] == str(zoo["timm-vit"])
    # a resume continues the adapters; a fine-tune --from starts from the merged encoder
    resumed = _ok(cli("finetune", "--resume", str(run), "train.max_steps=4", "--json"))
    assert resumed["status"] == "completed"
    chained = _ok(
        cli("finetune", "--from", str(run), "data.labels_per_class=2", "train.max_steps=1", "finetune.unlabeled.weight=0", "--json")
    )
    first = checkpoints.read(Path(chained["run_dir"]) / "checkpoints" / "last.pt")
    assert not any(".lora_" in k for k in first.model)
    assert first.data["mean"] == [0.5, 0.5, 0.5]  # the chain normalizes as the weights' pretrained_cfg says, not the digits


def test_layer_decay_scales_each_blocks_learning_rate_by_its_depth(zoo, digits):
    training = training_of(
        {"name": "hf", "weights": str(zoo["hf-vit"])},
        {"name": "mnist", "root": str(digits)},
        finetune={"layer_decay": 0.5, "encoder_lr_scale": 1.0},
        optimizer={"name": "adamw", "lr": 1.0},
    )
    rates = {}
    names = {id(p): n for n, p in training.network.named_parameters()}
    for group in training.optimizer.param_groups:
        for parameter in group["params"]:
            rates[names[id(parameter)]] = group["lr"]
    assert rates["encoder.model.embeddings.patch_embeddings.projection.weight"] == 0.125  # depth 0 of top 3
    assert rates["encoder.model.layers.0.attention.q_proj.weight"] == 0.25
    assert rates["encoder.model.layers.1.mlp.fc2.weight"] == 0.5
    assert rates["encoder.model.layernorm.weight"] == 1.0
    assert all(rate == 1.0 for name, rate in rates.items() if name.startswith("head."))


def test_lora_refuses_what_it_cannot_combine_with_in_one_line(cli, zoo, digits, tmp_path):
    recipe = Path(__file__).parent.parent / "configs" / "finetune10_mnist.yaml"
    base = ["model.name=timm", f"model.weights={zoo['timm-convnext']}", f"data.root={digits}", "model.input_size=32"]
    no_linear = cli("finetune", "-c", str(recipe), *base, "finetune.lora.r=4", "--runs-dir", str(tmp_path / "runs"))
    assert no_linear.code == 2 and "finetune.lora.target_modules" in no_linear.stderr and "fc1" in no_linear.stderr, no_linear.stderr
    frozen = cli("finetune", "-c", str(recipe), *base, "finetune.lora.r=4", "finetune.freeze_encoder=true")
    assert frozen.code == 2 and "drop finetune.freeze_encoder" in frozen.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("missing", "override", "pip"),
    [("timm", "model.arch=resnet18", "transferctl[timm]"), ("peft", "finetune.lora.r=4", "transferctl[peft]")],
)
def test_a_missing_extra_is_one_line_naming_the_pip_command(cli, zoo, digits, monkeypatch, missing, override, pip):
    monkeypatch.setitem(__import__("sys").modules, missing, None)  # `import timm` raises ImportError
    recipe = Path(__file__).parent.parent / "configs" / "finetune10_mnist.yaml"
    model = ["model.name=timm"] if missing == "timm" else ["model.name=hf", f"model.weights={zoo['hf-vit']}"]
    result = cli("finetune", "-c", str(recipe), *model, override, f"data.root={digits}")
    assert result.code == 2 and f'pip install "{pip}"' in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_speech_checkpoint_that_does_not_normalize_is_fed_the_samples_as_they_are(recordings, tmp_path):
    """A feature extractor with do_normalize: false (WavLM base's) gives the model the samples in [-1, 1] as they are: so
    does the run (`front_end: raw_waveform`), not the standardized waveform."""
    torch.manual_seed(CHECKPOINT_SEED)
    _tiny_speech("wavlm").save_pretrained(tmp_path / "wavlm")
    extractor = transformers.Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=False)
    extractor.save_pretrained(tmp_path / "wavlm")
    training = training_of({"name": "hf", "weights": str(tmp_path / "wavlm")}, {"name": "fsdd", "root": str(recordings)})
    assert training.cfg.data.options["front_end"] == "raw_waveform"
    train = training.train
    ours = training.modality.model_input(train.inputs[:2], train)
    samples = [(train.inputs[i].float() / 32768).numpy() for i in range(2)]
    padded = extractor(samples, sampling_rate=16000, padding="max_length", max_length=train.clip_samples, return_tensors="pt")
    torch.testing.assert_close(ours, padded["input_values"], atol=1e-6, rtol=0)  # one-second clips, zero-padded
