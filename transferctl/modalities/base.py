"""What a modality tells the rest of transferctl about its data.

A modality (image, audio, text) turns a split's raw samples into model inputs, names the augmentations that
fit them, builds example inputs for `config check` and export, carries the state fitted on the training split
with a run (an image split's mean and std), and says what the model card writes about the input. Pipelines,
evaluation, export and plots call these methods; none of them knows a modality by name.

Raw samples become model inputs in two steps, so augmentations sit between them and see what they expect:
`decode` (raw -> floats the augmentations act on, e.g. pixels in [0, 1]) and `normalize` (-> what the model takes).

Files (or texts) become raw samples in one place per modality, `read`, which the modality's data sets decode
their files with too: a trained model's inputs are decoded exactly as its training split was, from the fitted state
alone (which records the decoding: an image's size, channels and resize policy; audio's sample rate and clip; text's
tokenizer, length and truncation).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from transferctl.data.samples import NO_LABEL, Samples
from transferctl.data.targets import Placement
from transferctl.errors import ConfigError
from transferctl.registry import Entry

# One input decoded for a trained model: (raw sample, what batching it needs to know of it: an image's own size)
Decoded = tuple[Any, dict[str, Any]]
Reader = Callable[[Any, str], Decoded]  # (a file's path or bytes, or a text; its name for messages) -> Decoded


@dataclass(frozen=True)
class ReadBatch:
    """Inputs read for a trained model as one batch (`Modality.batch_of`): the samples (raw inputs, side information),
    per sample what its record says of how it was read (`fields`: a text's `cut`), and where each input's own pixels
    lie in the model's input (`placements`: images; None for other modalities). What `Task.decode` puts outputs back
    on their inputs with."""

    samples: Samples
    fields: list[dict[str, Any]] = field(default_factory=list)
    placements: list[Placement] | None = None


def unlabelled(count: int, fitted: Mapping[str, Any]) -> dict[str, Any]:
    """The `Samples` fields of `count` samples read for a trained run: a NO_LABEL placeholder target each, and the
    run's classes and target names (`fitted`: a checkpoint's `data`)."""
    names = tuple(fitted.get("target_names", ()))
    return {
        "targets": torch.full((count,), NO_LABEL, dtype=torch.long),
        "classes": tuple(fitted.get("classes", ())),
        "target_names": names,
        "target_kind": "values" if names else "class",
    }


class Modality:
    """Base class of a registered modality (`@MODALITIES.register("name")`): stateless, one instance per name."""

    input_name: ClassVar[str] = "inputs"  # the exported model's input
    # every input an export takes, in order (text: ids and their attention mask); one for most modalities
    input_names: ClassVar[tuple[str, ...]] = ()
    # export input -> its axis that varies with a sample's length (audio: samples; text: tokens): dynamic in the exports
    # of a task that takes inputs of any length (`Task.variable_length`)
    length_axes: ClassVar[Mapping[str, int]] = {}
    channels_last: ClassVar[bool] = False  # its model inputs are NCHW images, where channels-last memory pays
    # augmentation role -> registered augmentation; methods ask for a role ("strong" views, "light" for labels)
    augmentations: ClassVar[Mapping[str, str]] = {}
    unit_signal: ClassVar[bool] = False  # `to_signal` gives values in [0, 1] (pixels), which a loss like bce can take
    inherits_fitted_state: ClassVar[bool] = False  # a fine-tune reads its data with its source run's fitted state
    shows_inputs: ClassVar[bool] = True  # `displayable` draws its inputs (views.png, reconstructions.png)
    default_model: ClassVar[str] = "cnn"  # the encoder of a config that names none
    file_types: ClassVar[tuple[str, ...]] = ()  # the file suffixes it reads (what a folder given to predict yields)
    reads_texts: ClassVar[bool] = False  # its inputs are texts themselves, not files
    decodes_in_workers: ClassVar[bool] = True  # predict decodes its inputs in DataLoader workers (not worth it for texts)
    samples_vary_in_length: ClassVar[bool] = False  # texts, recordings: what `data.group_by_length` can group by

    def export_input_names(self, data: Samples | None = None) -> tuple[str, ...]:
        """The exported model's inputs, in order, for a model trained on splits like `data`."""
        return self.input_names or (self.input_name,)

    def fed_side_inputs(self) -> frozenset[str]:
        """The side information its exports compute from their own inputs and hand to the network (audio: each
        recording's `lengths`, from its length in samples); an export refuses a network that takes any other."""
        return frozenset()

    def resolve_data(self, options: Mapping[str, Any], model: Entry, task: type | None) -> dict[str, Any]:
        """Data options that follow the registered model (`model.meta`) and the task class (None: a method without
        one), given the options the config sets (`options`): what to set where the config sets nothing (audio:
        `front_end` from the model's `front_end` meta; whole recordings for a `variable_length` task). A config error
        where the config sets a value the model or task cannot take."""
        return {}

    def model_context(self, sample_shape: tuple[int, ...], fitted: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The keyword arguments a model builder takes from the data (images: in_channels and image_size), given
        the shape of one model input and the training split's fitted state (text: its tokenizer's vocabulary)."""
        raise NotImplementedError

    def head_context(self, fitted: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What a head builder takes from the data beyond the encoder's sizes (text: the vocabulary size)."""
        return {}

    def notes(self, data: Samples) -> list[str]:
        """One-line notes on how the training split was read (text: how many texts were cut short)."""
        return []

    def companion_files(self, fitted: Mapping[str, Any]) -> dict[str, bytes]:
        """Files a run and an export keep beside the model, built from the fitted state (text: tokenizer.json)."""
        return {}

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        """A batch of raw samples as the floats the augmentations act on."""
        raise NotImplementedError

    def normalize(self, x: torch.Tensor, data: Samples) -> torch.Tensor:
        """Decoded (and augmented) samples as the model's inputs."""
        raise NotImplementedError

    def with_lengths(self, data: Samples) -> Samples:
        """`data` with each sample's length as its `lengths` side information: what `data.group_by_length` groups
        training batches by. Recordings of any length have theirs; samples of one size have none to group by."""
        if "lengths" in data.side:
            return data
        raise ConfigError(f"data.group_by_length: {data.modality} samples here are all one size, with no lengths to group; drop it")

    def cut_padding(self, x: torch.Tensor, side: Mapping[str, torch.Tensor], data: Samples) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A decoded training batch and its side information cut to the batch's longest sample, where padding is cut
        off without changing a real step's output (text); as it is for any other modality."""
        return x, dict(side)

    def model_input(self, raw: torch.Tensor, data: Samples) -> torch.Tensor:
        """Raw samples straight to model inputs: what evaluation and export feed the model."""
        return self.normalize(self.decode(raw), data)

    def augment_context(self, data: Samples) -> dict[str, Any]:
        """What the augmentation builders take from the data set."""
        return {}

    def example_input(self, data: Samples, count: int) -> torch.Tensor:
        """`count` model inputs of the data's shape (zeros): a forward pass that checks a model fits the data."""
        return torch.zeros(count, *data.sample_shape)

    def fitted_state(self, data: Samples) -> dict[str, Any]:
        """What reading other data as the training split was read needs (checkpoints and exports carry it)."""
        return {}

    def read(self, inputs: Sequence[str | Path], fitted: Mapping[str, Any]) -> Samples:
        """Files (image and audio: paths; text: the texts themselves) as this modality's `Samples`, decoded exactly as
        the training split was, from a trained run's `fitted` (a checkpoint's `data`: classes, target names and the
        fitted state): each target a NO_LABEL placeholder, the classes the run's. A file that cannot be decoded is a
        one-line UsageError naming it."""
        read_one = self.reader(fitted)
        return self.batch_of([read_one(Path(x) if not self.reads_texts else x, str(x)) for x in inputs], fitted).samples

    def reader(self, fitted: Mapping[str, Any]) -> Reader:
        """What decodes one input as the training split's files were (`fitted`, as `read` takes it): a picklable
        callable, which predict runs in DataLoader workers, from a file's path or bytes (text: the text) and its name
        to (raw sample, what `batch_of` needs of it). An input it cannot read is a one-line UsageError naming it."""
        raise NotImplementedError

    def batch_of(self, decoded: Sequence[Decoded], fitted: Mapping[str, Any]) -> ReadBatch:
        """Decoded inputs (`reader`'s) as one batch of this modality's samples, stacked, padded or tokenized as its data
        sets hold theirs."""
        raise NotImplementedError

    def card_fitted(self, fitted: Mapping[str, Any]) -> dict[str, Any]:
        """The fitted state as an export's model card keeps it (text: its tokenizer named by the file beside it)."""
        return dict(fitted)

    def fitted_from_card(self, card: Mapping[str, Any], folder: Path) -> dict[str, Any]:
        """An export folder's fitted state, from its model card (`card_fitted`'s; a card of a release before it, from its
        `input` description) and the files beside it: what predict reads new inputs with."""
        raise NotImplementedError

    def card_input(self, raw: torch.Tensor, data: Samples, card: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        """Raw samples as the inputs of an export that `card` describes (an earlier release's image export takes them
        normalized)."""
        inputs = self.export_input(raw, data)
        return inputs if isinstance(inputs, tuple) else (inputs,)

    def input_shape(self, fitted: Mapping[str, Any]) -> tuple[int, ...] | None:
        """The shape of one model input, from the fitted state alone; None where it does not say (an image run's
        from before checkpoint format 3, which recorded no image size)."""
        return None

    def completed_fitted(self, fitted: Mapping[str, Any], options: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
        """An older checkpoint's fitted state with the decoding it did not record filled in as its data set decoded
        then (`options`: the run's data options; `meta`: the data set's registration); what it records is kept."""
        return dict(fitted)

    def resumed_data_options(self, options: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
        """Data options a resume of the run in `run_dir` reads its data with instead of the config's, so it reads the data
        as the run did whatever became of the files the config names (text: the run's own tokenizer.json, not a
        checkpoint folder that may have moved or changed)."""
        return {}

    def with_statistics(self, data: Samples, statistics: Mapping[str, Any]) -> Samples:
        """`data` normalized with a pretrained model's statistics (`input_statistics` in its registration; images: the
        mean and std its weights were trained with) instead of its own."""
        return data

    def as_trained(self, data: Samples, fitted: dict[str, Any]) -> Samples:
        """`data` read with the training split's fitted state."""
        return data

    def inherited(self, data: Samples, source: dict[str, Any]) -> tuple[Samples, str | None]:
        """`data` as a fine-tune from a run reads it, given that run's fitted state (called only where
        `inherits_fitted_state`: audio takes the source's front end, which its encoder learnt to read; images keep
        their own statistics), and a note naming the data options that then have no effect, if any."""
        return data, None

    def served(self, module: nn.Module, fitted: dict[str, Any]) -> nn.Module:
        """What an export holds around the trained module (images: the module itself, on normalized images; audio:
        the front end, then the module, on raw waveforms), built from the training split's fitted state."""
        return module

    def export_input(self, raw: torch.Tensor, data: Samples) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Raw samples as the exported model's inputs (what `served` takes; a tuple where it takes several)."""
        return self.model_input(raw, data)

    def to_signal(self, x: torch.Tensor, data: Samples) -> torch.Tensor:
        """Model inputs as the signal a reconstruction is scored on (images: pixels in [0, 1])."""
        raise NotImplementedError

    def from_signal(self, x: torch.Tensor, data: Samples) -> torch.Tensor:
        """The inverse of `to_signal`."""
        raise NotImplementedError

    def describe_input(self, data: Samples) -> dict[str, Any]:
        """The model card's `input`: name, shape, dtype and the preprocessing a caller must apply."""
        raise NotImplementedError

    def displayable(self, x: torch.Tensor, data: Samples) -> torch.Tensor:
        """Model inputs back to something a plot can show (images: pixels in [0, 1], NHWC)."""
        raise NotImplementedError
