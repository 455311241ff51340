"""Autoencoder and masked-autoencoder pretraining: the mask, the loss on hidden patches, denoising targets, the
decoder's shape, one-line errors, and the whole chain (evaluate, finetune --from, export, reconstructions.png,
exact resume after SIGKILL)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import write_config
from tests.test_resume import killed_and_resumed
from transferctl.data import Batch
from transferctl.losses import mse
from transferctl.methods.reconstruction import GaussianNoise, PatchMask, ReconstructionObjective, decoder, hidden_patches, to_signal
from transferctl.modalities import ImageData

MAE = """\
method: {{name: mae, mask_ratio: 0.75, patch_size: 4}}
model: {{name: cnn, widths: [8, 16]}}
optimizer: {{name: adamw, lr: 0.003}}
scheduler: {{name: constant}}
data: {{name: mnist, root: {root}, batch_size: 64, eval_batch_size: 256, augment: {{name: none}}}}
train: {{epochs: 3, log_every: 2, device: cpu}}
"""


def digits(n: int = 4, size: int = 8) -> ImageData:
    pixels = torch.randint(0, 256, (n, 1, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return ImageData(pixels, torch.zeros(n, dtype=torch.long), ("a",), (0.5,), (0.25,), False)


def test_the_mask_hides_the_declared_share_of_patches_in_every_image():
    hidden = hidden_patches(6, 28, 28, 4, 0.75, torch.Generator().manual_seed(1))
    assert hidden.shape == (6, 1, 28, 28) and hidden.dtype == torch.bool
    per_image = hidden.flatten(1).sum(1)
    assert per_image.tolist() == [(49 - int(49 * 0.25)) * 16] * 6  # as MAE: all but int(49 * (1 - 0.75)) patches
    patches = hidden[:, 0, ::4, ::4]
    assert torch.equal(hidden, patches.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1))  # whole patches
    assert not torch.equal(hidden[0], hidden[1])  # each image its own
    assert torch.equal(hidden, hidden_patches(6, 28, 28, 4, 0.75, torch.Generator().manual_seed(1)))


def test_every_rank_draws_the_global_batch_and_keeps_its_share():
    """So two processes hide what one process hides in the same global batch."""
    mask, x = PatchMask(0.5, 2, weigh_hidden=True), torch.randn(8, 1, 8, 8)
    (_, whole) = mask(x, torch.Generator().manual_seed(3), 0, 1)
    shares = [mask(x[r * 4 : (r + 1) * 4], torch.Generator().manual_seed(3), r, 2)[1] for r in (0, 1)]
    assert torch.equal(torch.cat(shares), whole)


def test_the_loss_counts_hidden_patches_only():
    x = torch.randn(4, 1, 8, 8)
    corrupted, weight = PatchMask(0.5, 4, weigh_hidden=True)(x, torch.Generator().manual_seed(0), 0, 1)
    assert torch.equal(corrupted[weight], torch.zeros(int(weight.sum())))  # hidden pixels hold the mean (0)
    assert torch.equal(corrupted[~weight], x[~weight])
    loss, prediction = mse(), torch.zeros_like(x)
    before = loss(prediction, x, weight)
    visible_changed = prediction.masked_fill(~weight, 5.0)
    assert loss(visible_changed, x, weight) == before  # a wrong visible pixel costs nothing
    hidden_changed = prediction.masked_fill(weight, 5.0)
    assert loss(hidden_changed, x, weight) > before
    assert before == pytest.approx((x[weight] ** 2).mean().item())


def test_denoising_corrupts_the_input_and_reconstructs_the_clean_image():
    data = digits()
    clean = (data.inputs.float() / 255 - 0.5) / 0.25
    identity = torch.nn.Identity()
    noisy = ReconstructionObjective(identity, mse(), GaussianNoise(0.2, data), data, seed=0)
    replay = torch.Generator()
    replay.set_state(noisy.generator.get_state())  # the draws the objective is about to make
    loss = noisy.loss(Batch((clean,), data.targets), 0).item()
    corrupted, _ = noisy.corrupt(clean, replay, 0, 1)
    added = to_signal(corrupted, data) - to_signal(clean, data)
    assert 0.1 < added.std().item() < 0.25 and to_signal(corrupted, data).min() >= 0  # noise in pixels, clipped to [0, 1]
    # a model that hands back its input is wrong by exactly the noise: the target is the clean image
    assert loss == pytest.approx(((corrupted - clean) ** 2).mean().item(), rel=1e-5)
    masked = ReconstructionObjective(identity, mse(), PatchMask(0.5, 4, weigh_hidden=False), data, seed=0)
    hidden_input, weight = masked.corrupt(clean, torch.Generator().manual_seed(0), 0, 1)
    assert weight is None and not torch.equal(hidden_input, clean)  # the whole clean image is the target


@pytest.mark.parametrize(
    "model, options, shape", [("cnn", {"widths": (8, 16, 32)}, (1, 28, 28)), ("resnet18", {"small_images": False}, (3, 40, 40))]
)
def test_the_decoder_gives_back_the_input_shape(model, options, shape):
    from transferctl.components import load_components
    from transferctl.registry import MODELS

    load_components()
    encoder = MODELS.build(model, options, in_channels=shape[0], image_size=shape[-1])
    head = decoder(encoder.stage_channels, shape, width=16)
    assert head(encoder.feature_maps(torch.randn(2, *shape))).shape == (2, *shape)


def test_a_pooled_decoder_reads_the_pooled_features_alone():
    """`pooled`: a bottleneck through what k-NN, probes and fine-tunes read; where in the deepest map a feature
    sits cannot reach the decoder."""
    torch.manual_seed(0)
    shapes = ((8, 28, 28), (16, 14, 14), (32, 7, 7))
    head = decoder((8, 16, 32), (1, 28, 28), stage_shapes=shapes, pooled=True).eval()
    maps = [torch.randn(2, *shape) for shape in shapes]
    shuffled = maps[-1].flatten(2)[..., torch.randperm(49)].view(2, 32, 7, 7)
    with torch.no_grad():
        out = head(maps)
        assert out.shape == (2, 1, 28, 28) and torch.allclose(head([*maps[:-1], shuffled]), out, atol=1e-6)
        spatial = decoder((8, 16, 32), (1, 28, 28)).eval()
        assert not torch.allclose(spatial([*maps[:-1], shuffled]), spatial(maps))  # the default decoder reads positions


@pytest.mark.parametrize(
    "args, expected",
    [
        (["method.mask_ratio=1.0"], "method.mask_ratio: Input should be less than 1"),
        (["method.mask_ratio=0"], "method.mask_ratio: Input should be greater than 0"),
        (["method.patch_size=5"], "method.patch_size: 5 does not divide the 28x28 inputs"),
        (["method.norm_pix_loss=true", "loss.name=bce"], "method.norm_pix_loss: per-patch normalized targets are not in [0, 1]"),
        (["model.name=mlp"], "head 'decoder' reads an encoder's stage feature maps, and model 'mlp' has none"),
        (["method.name=autoencoder", "method.corruption=blur"], "method.corruption: Input should be 'none', 'noise' or 'mask'"),
    ],
)
def test_bad_options_are_one_line_errors(cli, tmp_path, digits_root, args, expected):
    config = write_config(tmp_path / "mae.yaml", MAE.format(root=digits_root))
    result = cli("pretrain", "-c", config, *args, "--runs-dir", tmp_path / "runs")
    assert result.code == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert expected in result.stderr and not (tmp_path / "runs").exists()


def test_config_check_puts_a_batch_through_the_encoders_feature_maps_and_the_decoder(cli, tmp_path, digits_root):
    config = write_config(tmp_path / "mae.yaml", MAE.format(root=digits_root))
    report = cli("config", "check", "-c", config, "--json")
    assert report.code == 0, report.stderr
    assert report.json["shapes"]["features"] == [[64, 8, 28, 28], [64, 16, 14, 14]] and report.json["shapes"]["output"] == [64, 1, 28, 28]


def _ok(result) -> dict:
    assert result.code == 0, result.stderr
    return result.json


def test_a_masked_autoencoder_learns_evaluates_fine_tunes_and_exports_its_encoder(cli, tmp_path, digits_root):
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "mae.yaml", MAE.format(root=digits_root))
    pre = _ok(cli("pretrain", "-c", config, "--runs-dir", runs, "--json"))
    rows = [json.loads(line) for line in (Path(pre["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] and rows[-1]["val_reconstruction_mse"] < rows[0]["val_reconstruction_mse"]
    assert pre["metrics"]["best_val_loss"] == min(r["val_loss"] for r in rows)  # best.pt by the reconstruction loss
    assert (Path(pre["run_dir"]) / "reconstructions.png").read_bytes().startswith(b"\x89PNG")
    scored = _ok(cli("evaluate", "--from", pre["run_id"], "--runs-dir", runs, "--json"))["metrics"]
    assert set(scored) == {"knn_accuracy", "reconstruction_mse", "test_images"} and scored["knn_accuracy"] > 0.3
    tuned = _ok(
        cli(
            "finetune",
            "--from",
            pre["run_id"],
            "data.labels_per_class=5",
            "data.batch_size=16",
            "train.max_steps=2",
            "--runs-dir",
            runs,
            "--json",
        )
    )
    weights = lambda run: torch.load(Path(run) / "checkpoints" / "last.pt", weights_only=True)["model"]
    source, tuned_weights = weights(pre["run_dir"]), weights(tuned["run_dir"])
    assert {k for k in tuned_weights if k.startswith("encoder.")} == {k for k in source if k.startswith("encoder.")}
    assert any(k.startswith("head.blocks") for k in source) and tuned_weights["head.2.weight"].shape == (10, 16)  # the decoder stays behind
    exported = _ok(cli("export", "--from", pre["run_id"], "--format", "torchscript", "--runs-dir", runs, "--json"))
    card = json.loads((Path(pre["run_dir"]) / "export" / "model_card.json").read_text())
    assert exported["parity"]["torchscript"]["passed"] and (card["kind"], card["output"]["shape"]) == ("encoder", ["batch", 16])


def test_a_killed_masked_autoencoder_resumes_bit_exactly(tmp_path, digits_root):
    config = write_config(tmp_path / "mae.yaml", MAE.format(root=digits_root))
    short = ["train.epochs=2", "train.checkpoint_every=2"]
    a, b = killed_and_resumed("pretrain", config, short, tmp_path)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["training"]["objective"]["generator"], b["training"]["objective"]["generator"])  # the masks drawn
