"""Encoders over sequences of feature vectors: bidirectional recurrent networks (`gru`, `lstm`) and a 1-D conv
net (`conv1d`). The sequence is a clip's mel frames, the model input (N, 1, n_mels, frames) read as `frames`
vectors of `n_mels` features, or a text's tokens, (N, length) ids read through a token embedding. They follow
the encoder contract (`models/encoders.py`): forward gives pooled features (N, feature_dim), and `token_features`
their features at every step, which masked language modelling and per-frame heads (CTC) read. Frames of recordings
of any length come with their `lengths` (side information), and padding never changes a real step's features.
None has 2-D stage maps, so dense heads (decoders, segmentation) do not fit them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, PositiveInt
from torch import nn

from transferctl.errors import ConfigError
from transferctl.registry import MODELS


def spectrogram_frames(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, features, frames) spectrograms -> (N, frames, features) sequences."""
    return x.squeeze(1).transpose(1, 2)


class AttentionPooling(nn.Module):
    """A learnt score per step, softmax over the steps that count, and the weighted mean of the steps."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, steps: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.score(steps).squeeze(-1)
        if mask is not None:  # a row without a real step (an all-zero attention mask) weighs every step alike
            scores = scores.masked_fill(~mask & mask.any(dim=1, keepdim=True), float("-inf"))
        return (scores.softmax(dim=1).unsqueeze(-1) * steps).sum(dim=1)


def mean_pool(steps: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over the steps that count (every step without a mask)."""
    if mask is None:
        return steps.mean(dim=1)
    weight = mask.unsqueeze(-1).to(steps.dtype)
    return (steps * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)


def length_mask(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """(N, steps) True at each sequence's first `length` steps."""
    return torch.arange(steps, device=lengths.device).view(1, -1) < lengths.view(-1, 1)


def reverse_within(steps: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Each sequence's first `length` steps in reverse order, its padding left where it is (an involution)."""
    if lengths is None:
        return steps.flip(1)
    positions = torch.arange(steps.shape[1], device=steps.device)
    index = torch.where(positions < lengths.unsqueeze(1), lengths.unsqueeze(1) - 1 - positions, positions)
    return steps.gather(1, index.unsqueeze(-1).expand_as(steps))


class BidirectionalLayer(nn.Module):
    """One GRU or LSTM layer read both ways. The backward direction reads each sequence reversed within its length,
    so neither direction ever reads padding before a real step: padding cannot change the outputs at real steps
    (what packed sequences give, in plain tensor ops that export to ONNX)."""

    def __init__(self, cell: str, features: int, hidden_dim: int):
        super().__init__()
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.forward_rnn = rnn(features, hidden_dim, batch_first=True)
        self.backward_rnn = rnn(features, hidden_dim, batch_first=True)

    def forward(self, steps: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        ahead, _ = self.forward_rnn(steps)
        behind, _ = self.backward_rnn(reverse_within(steps, lengths))
        return torch.cat([ahead, reverse_within(behind, lengths)], dim=-1)


def read_word_vectors(path: str, vocabulary: dict[str, int], dim: int) -> dict[int, torch.Tensor]:
    """token id -> vector, for the tokens of `vocabulary` that a word2vec or GloVe text file holds (a line per word:
    the word, then its numbers; word2vec's first line, "count dim", is skipped). Words are matched as they are,
    then lowercased; other lines are never kept in memory."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"model.embeddings {path}: no such file; give a word2vec or GloVe text file")
    lowered = {token.lower(): index for token, index in vocabulary.items()}
    found: dict[int, torch.Tensor] = {}
    with file.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            word, _, numbers = line.rstrip().partition(" ")
            index = vocabulary.get(word, lowered.get(word.lower()))
            if index is None or index in found:
                continue
            values = numbers.split()
            if len(values) != dim:
                if number == 1 and len(values) == 1:  # word2vec's header
                    continue
                raise ConfigError(
                    f"model.embeddings {path}: line {number} has {len(values)} numbers, and the table is {dim} wide; "
                    f"set the embedding width to {len(values)}"
                )
            found[index] = torch.tensor([float(v) for v in values])
    if not found:
        raise ConfigError(
            f"model.embeddings {path}: none of its words is in the tokenizer's vocabulary; give vectors of the texts' language"
        )
    return found


class TokenEmbedding(nn.Module):
    """Token ids (N, length) -> their embeddings (N, length, dim) and the mask of real (non-pad) tokens."""

    def __init__(self, vocab_size: int, dim: int, pad_id: int):
        super().__init__()
        self.pad_id = pad_id
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=pad_id)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embedding(ids), ids != self.pad_id


class RecurrentEncoder(nn.Module):
    """Sequences -> stacked bidirectional GRU or LSTM layers -> the mean or attention-weighted mean of the last
    layer's outputs over the real steps. Sequences are a spectrogram's frames (N, 1, features, frames), with their
    `lengths` where recordings of any length share a padded batch, or token ids (N, length) read through a token
    embedding (`vocab_size`), whose padding is masked out."""

    def __init__(
        self,
        cell: str,
        features: int,
        hidden_dim: int,
        layers: int,
        pooling: str,
        dropout: float,
        vocab_size: int | None = None,
        pad_id: int = 0,
        word_vectors: WordVectors | None = None,
    ):
        super().__init__()
        self.tokens = TokenEmbedding(vocab_size, features, pad_id) if vocab_size else None
        self.side_inputs = () if vocab_size else ("lengths",)  # tokens carry their own mask; frames take their lengths
        self.word_vectors = word_vectors
        self.norm = nn.LayerNorm(features)
        widths = [features] + [2 * hidden_dim] * (layers - 1)
        self.layers = nn.ModuleList(BidirectionalLayer(cell, width, hidden_dim) for width in widths)
        self.dropout = nn.Dropout(dropout)
        self.feature_dim = 2 * hidden_dim
        self.pool = AttentionPooling(self.feature_dim) if pooling == "attention" else None
        self.register_load_state_dict_pre_hook(_from_packed_gru)

    @property
    def word_embedding(self) -> nn.Embedding | None:
        """The token embedding table (over token ids), which a masked-language-model head ties its output to."""
        return self.tokens.embedding if self.tokens is not None else None

    def load_word_vectors(self) -> None:
        if self.word_vectors is not None:
            self.word_vectors.load_into(self.word_embedding)

    def token_features(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The last layer's output at every step (N, steps, feature_dim), and the mask of real steps (None: all).
        Frames of recordings of any length come with their `lengths` (the steps padding cannot change): no step
        before one's length reads its padding; tokens carry their own mask."""
        if self.tokens is not None:
            steps, mask = self.tokens(x)
            lengths = mask.sum(dim=1)
        else:
            steps = spectrogram_frames(x)
            mask = length_mask(lengths, steps.shape[1]) if lengths is not None else None
        steps = self.norm(steps)
        for index, layer in enumerate(self.layers):
            steps = layer(self.dropout(steps) if index else steps, lengths)
        return steps, mask

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        steps, mask = self.token_features(x, lengths)
        return self.pool(steps, mask) if self.pool is not None else mean_pool(steps, mask)


def _from_packed_gru(module: nn.Module, state: dict, prefix: str, *args) -> None:
    """Weights saved by transferctl 0.4.0, whose gru was one nn.GRU (`rnn.weight_ih_l1_reverse`), renamed to the layers."""
    for key in [k for k in state if k.startswith(f"{prefix}rnn.")]:
        name = key[len(prefix) + 4 :]  # weight_ih_l1 or weight_ih_l1_reverse
        weight, _, rest = name.rpartition("_l")
        layer, _, reverse = rest.partition("_")
        direction = "backward_rnn" if reverse else "forward_rnn"
        state[f"{prefix}layers.{layer}.{direction}.{weight}_l0"] = state.pop(key)


Layers = Annotated[int, Field(ge=1, le=6)]
Dropout = Annotated[float, Field(ge=0.0, lt=1.0)]


@dataclass(frozen=True)
class WordVectors:
    """Starting vectors for a token embedding table (`model.embeddings`), loaded with the starting weights: a fresh
    run reads the file, a resumed or fine-tuned one takes its weights from its checkpoint or source."""

    path: str
    vocabulary: dict[str, int] = field(repr=False)

    def load_into(self, table: nn.Embedding) -> None:
        with torch.no_grad():
            for index, vector in read_word_vectors(self.path, self.vocabulary, table.embedding_dim).items():
                table.weight[index] = vector


def word_vectors_of(embeddings: str | None, vocabulary: dict[str, int] | None) -> WordVectors | None:
    if embeddings is None:
        return None
    if vocabulary is None:
        raise ConfigError("model.embeddings: word vectors initialize a token embedding table, and this data has no tokens; drop it")
    return WordVectors(str(Path(embeddings).expanduser().resolve()), vocabulary)


def _recurrent(cell, sequence_features, vocab_size, pad_id, vocabulary, embed_dim, hidden_dim, layers, pooling, dropout, embeddings):
    features = embed_dim if vocab_size else sequence_features
    vectors = word_vectors_of(embeddings, vocabulary)
    return RecurrentEncoder(cell, features, hidden_dim, layers, pooling, dropout, vocab_size, pad_id, vectors)


@MODELS.register(modality=("audio", "text"), channels_last=False, gives=("token_features",))
def gru(
    sequence_features: int | None = None,
    vocab_size: int | None = None,
    pad_id: int = 0,
    hidden_dim: PositiveInt = 128,
    layers: Layers = 2,
    pooling: Literal["mean", "attention"] = "mean",
    dropout: Dropout = 0.0,
    embed_dim: PositiveInt = 128,
    embeddings: str | None = None,
    vocabulary: dict[str, int] | None = None,
) -> RecurrentEncoder:
    """A bidirectional GRU over mel frames or token embeddings (embed_dim), mean- or attention-pooled; 2 x hidden_dim features."""
    return _recurrent("gru", sequence_features, vocab_size, pad_id, vocabulary, embed_dim, hidden_dim, layers, pooling, dropout, embeddings)


@MODELS.register(modality=("audio", "text"), channels_last=False, gives=("token_features",))
def lstm(
    sequence_features: int | None = None,
    vocab_size: int | None = None,
    pad_id: int = 0,
    hidden_dim: PositiveInt = 128,
    layers: Layers = 2,
    pooling: Literal["mean", "attention"] = "mean",
    dropout: Dropout = 0.0,
    embed_dim: PositiveInt = 128,
    embeddings: str | None = None,
    vocabulary: dict[str, int] | None = None,
) -> RecurrentEncoder:
    """A bidirectional LSTM over mel frames or token embeddings (embed_dim), mean- or attention-pooled; 2 x hidden_dim features."""
    return _recurrent(
        "lstm", sequence_features, vocab_size, pad_id, vocabulary, embed_dim, hidden_dim, layers, pooling, dropout, embeddings
    )


class ConvSequenceEncoder(nn.Sequential):
    """Conv1d-BN-ReLU stages over the steps (features as channels), max-pooled between stages, then averaged.

    Its features at every frame (`token_features`) are the same stages read densely, a trous: after each max-pool
    of 2 the next convolutions are dilated twice as far, and each pool takes the maximum of a frame and the one
    `dilation` frames on, so frame t holds what the pooled network computes for the window starting at t, at the
    input's own frame rate (what a per-frame head such as CTC's needs). With `lengths`, every step past a
    sequence's length is zeroed before each convolution and pool: padding reads as the convolutions' own zero
    padding, and a padded batch gives each sequence the features it has alone."""

    side_inputs = ("lengths",)

    def __init__(self, features: int, widths: tuple[int, ...], kernel_size: int):
        layers: list[nn.Module] = []
        cin = features
        for stage, width in enumerate(widths):
            layers += [
                nn.Conv1d(cin, width, kernel_size, padding=kernel_size // 2, bias=False),
                nn.BatchNorm1d(width),
                nn.ReLU(inplace=True),
            ]
            if stage < len(widths) - 1:
                layers.append(nn.MaxPool1d(2))
            cin = width
        super().__init__(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.feature_dim = cin

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is None:
            return super().forward(x.squeeze(1))  # (N, features, steps): the features are the channels
        steps, mask = self.token_features(x, lengths)
        return mean_pool(steps, mask)

    def token_features(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features at every frame (N, frames, feature_dim), and the mask of real frames (None: all)."""
        steps = x.squeeze(1)
        mask = length_mask(lengths, steps.shape[-1]).unsqueeze(1).to(steps.dtype) if lengths is not None else None
        dilation = 1
        for module in list(self)[:-2]:  # the stages, without the global pool and flatten
            if isinstance(module, nn.Conv1d):
                steps = steps * mask if mask is not None else steps
                reach = dilation * (module.kernel_size[0] // 2)
                steps = nn.functional.conv1d(steps, module.weight, module.bias, padding=reach, dilation=dilation)
            elif isinstance(module, nn.MaxPool1d):
                steps = steps * mask if mask is not None else steps  # after a ReLU: zeros never win the maximum
                steps = torch.maximum(steps, nn.functional.pad(steps, (0, dilation))[..., dilation:])
                dilation *= 2
            else:
                steps = module(steps)
        return steps.transpose(1, 2), mask.squeeze(1).bool() if mask is not None else None


@MODELS.register(modality="audio", channels_last=False, gives=("token_features",))
def conv1d(
    sequence_features: int,
    widths: Annotated[tuple[PositiveInt, ...], Field(min_length=1, max_length=6)] = (64, 128, 256),
    kernel_size: Annotated[int, Field(ge=1, le=15)] = 5,
) -> ConvSequenceEncoder:
    """A 1-D conv net over mel frames (the mel bins as channels): conv stages with max-pooling, then average pooling."""
    return ConvSequenceEncoder(sequence_features, tuple(widths), kernel_size)
