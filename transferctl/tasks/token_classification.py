"""Token classification (named entities): a tag per word, from a head over the encoder's features at every token.

Words are split into subword tokens by the run's tokenizer; the `word_ids` side information says which word each
token belongs to (and is computed again whenever another tokenizer reads the texts), so the tags stay per word. A
word's tag is trained and predicted at its first subword (Hugging Face's `run_ner.py` rule); with
`label_all_subwords` its other subwords learn the word's inside tag too (B-X becomes I-X). The head (`tagger`) is a
linear layer over the token features, optionally with a CRF (`head.crf: true`): a linear-chain CRF over every real
token (continuation subwords carry the word's inside tag, [CLS] and [SEP] are O), whose Viterbi decoding never takes
a transition that IOB2 forbids (O or another type into I-X).

What the run serves (evaluation, predict, exports) is per-token tag probabilities (N, tokens, tags): the softmax of
the logits, or with a CRF the Viterbi path, each token's tag at its marginal probability and 0 elsewhere; rows of
padding are 0. Words that `max_length` cut off get no token: they are predicted O and counted so in the metrics.
Metrics are entity-level (exact span and type, micro-averaged over entities, per-type F1), counted as conlleval and
seqeval's default mode count them.

A sentence read with its document's context (`data.document_context`) has tokens of no word of its own
(CONTEXT_WORD): the encoder reads them, the loss, the CRF's chain and the metrics leave them out, and their rows are
0. A text given to predict or to an export is tagged whole: give a document, and all of it is tagged.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from transferctl import agreement
from transferctl.data.samples import Batch, Samples, iterate_batches
from transferctl.data.tagging import OUTSIDE, entity_type
from transferctl.data.targets import TargetList
from transferctl.engine.evaluate import Evaluation
from transferctl.engine.train import Selection
from transferctl.errors import ConfigError
from transferctl.modalities import modality_of
from transferctl.modalities.text import CONTEXT_WORD, SentenceInContext, cut_to_longest, longest_text, text_lengths
from transferctl.registry import HEADS, LOSSES, TASKS
from transferctl.tasks.base import Task

if TYPE_CHECKING:
    from transferctl.modalities.base import ReadBatch
    from transferctl.runs import Run

IGNORED = -100  # a token whose tag no loss counts
FORBIDDEN = -1.0e4  # the score of a transition IOB2 forbids: no path that takes one can win


# --------------------------------------------------------------------------- the head


class CRF(nn.Module):
    """A linear-chain CRF over tags: transition scores (from, to), start and end scores; transitions that the tag
    scheme forbids (`allow_iob2`) are fixed at FORBIDDEN. `mask` says which tokens a row's sequence is: the real
    tokens, or of a sentence read in context only its own; the chain runs over them in order, as if the others were
    not there (they are moved behind them: `_packed`), and their outputs are 0."""

    def __init__(self, num_tags: int):
        super().__init__()
        self.transitions = nn.Parameter(torch.zeros(num_tags, num_tags))
        self.start = nn.Parameter(torch.zeros(num_tags))
        self.end = nn.Parameter(torch.zeros(num_tags))
        self.register_buffer("allowed", torch.ones(num_tags, num_tags, dtype=torch.bool))
        self.register_buffer("allowed_start", torch.ones(num_tags, dtype=torch.bool))

    def allow_iob2(self, tags: Sequence[str]) -> None:
        """Forbid what IOB2 forbids: I-X after anything but B-X or I-X, and I-X first."""
        for j, to in enumerate(tags):
            inside = to.startswith("I-")
            self.allowed_start[j] = not inside
            for i, before in enumerate(tags):
                self.allowed[i, j] = not inside or entity_type(before) == entity_type(to)

    def _scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transitions.masked_fill(~self.allowed, FORBIDDEN), self.start.masked_fill(~self.allowed_start, FORBIDDEN)

    def nll(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The negative log-likelihood of `tags` (N, L) (a tag at every masked token) per masked token; rows without
        one (a text whose words all have no token) count in nothing."""
        order = _packed(mask)
        emissions, tags, mask = _gather(emissions, order), _gather(tags, order), _gather(mask, order)
        kept = mask.any(1)
        emissions, tags, mask = emissions[kept], tags[kept], mask[kept]
        if not len(tags):
            return emissions.sum() * 0.0
        transitions, start = self._scores()
        emitted = emissions.gather(2, tags.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        steps = transitions[tags[:, :-1].clamp_min(0), tags[:, 1:].clamp_min(0)]
        last = tags.gather(1, (mask.sum(1) - 1).unsqueeze(1)).squeeze(1)
        gold = start[tags[:, 0]] + emitted[:, 0] + ((emitted[:, 1:] + steps) * mask[:, 1:]).sum(1) + self.end[last]
        return (self._log_partition(emissions, mask, transitions, start) - gold).sum() / mask.sum()

    def _forward_scores(self, emissions: torch.Tensor, mask: torch.Tensor, transitions: torch.Tensor, start: torch.Tensor) -> list:
        """The forward algorithm's log scores at every token (a list of (N, T)); padding keeps the last real one's."""
        alpha = start + emissions[:, 0]
        alphas = [alpha]
        for t in range(1, emissions.shape[1]):
            following = torch.logsumexp(alpha.unsqueeze(2) + transitions + emissions[:, t].unsqueeze(1), 1)
            alpha = torch.where(mask[:, t, None], following, alpha)
            alphas.append(alpha)
        return alphas

    def _log_partition(self, emissions: torch.Tensor, mask: torch.Tensor, transitions: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self._forward_scores(emissions, mask, transitions, start)[-1] + self.end, 1)

    def viterbi(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The best path's tags (N, L) at the masked tokens (the others' are any tag)."""
        order = _packed(mask)
        return _scattered(self._viterbi(_gather(emissions, order), _gather(mask, order)), order)

    def _viterbi(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The best path of sequences that are a prefix of each row; padding repeats the last real token's tag."""
        transitions, start = self._scores()
        score, history = start + emissions[:, 0], []
        keep = torch.arange(emissions.shape[2], device=emissions.device).expand(emissions.shape[0], -1)
        for t in range(1, emissions.shape[1]):
            best, before = (score.unsqueeze(2) + transitions).max(1)
            score = torch.where(mask[:, t, None], best + emissions[:, t], score)
            history.append(torch.where(mask[:, t, None], before, keep))
        tag = (score + self.end).argmax(1)
        path = [tag]
        for before in reversed(history):
            tag = before.gather(1, tag.unsqueeze(1)).squeeze(1)
            path.append(tag)
        return torch.stack(path[::-1], 1)

    def marginals(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """P(tag at token t | the text) (N, L, T) at the masked tokens, by the forward-backward algorithm."""
        order = _packed(mask)
        return _scattered(self._marginals(_gather(emissions, order), _gather(mask, order)), order)

    def _marginals(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        transitions, start = self._scores()
        alphas = self._forward_scores(emissions, mask, transitions, start)
        beta, betas = self.end.expand_as(alphas[0]), [self.end.expand_as(alphas[0])]
        for t in range(emissions.shape[1] - 2, -1, -1):
            behind = torch.logsumexp(transitions + (emissions[:, t + 1] + beta).unsqueeze(1), 2)
            beta = torch.where(mask[:, t + 1, None], behind, self.end.expand_as(behind))
            betas.append(beta)
        log_z = torch.logsumexp(alphas[-1] + self.end, 1)
        return (torch.stack(alphas, 1) + torch.stack(betas[::-1], 1) - log_z[:, None, None]).exp()

    def path_scores(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The Viterbi path (N, L, T): each masked token's tag at its marginal probability, 0 elsewhere."""
        order = _packed(mask)
        emissions, mask = _gather(emissions, order), _gather(mask, order)
        path = F.one_hot(self._viterbi(emissions, mask), emissions.shape[2]).to(emissions.dtype)
        return _scattered(path * self._marginals(emissions, mask) * mask.unsqueeze(-1), order)


def _packed(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the positions of the masked tokens in order, then the others': an identity where the mask is a prefix."""
    return (~mask).to(torch.int8).argsort(dim=1, stable=True)


def _gather(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    index = order.view(*order.shape, *(1,) * (values.ndim - 2)).expand_as(values)
    return values.gather(1, index)


def _scattered(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """`_gather`'s inverse: values of packed positions put back where they came from."""
    index = order.view(*order.shape, *(1,) * (values.ndim - 2)).expand_as(values)
    return torch.empty_like(values).scatter_(1, index, values)


class Tagger(nn.Module):
    """Tag logits at every token (N, L, tags): dropout and a linear layer over the token features, and a CRF when
    asked for (`crf`), which the loss and the decoding use."""

    def __init__(self, feature_dim: int, num_outputs: int, pad_id: int, dropout: float, crf: bool):
        super().__init__()
        self.pad_id = pad_id
        self.drop = nn.Dropout(dropout)
        self.classify = nn.Linear(feature_dim, num_outputs)
        self.crf = CRF(num_outputs) if crf else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.classify(self.drop(features))
        if self.crf is not None and self.training:
            # the CRF's scores are used by the loss, after the forward: a zero term puts them in the forward's graph,
            # so that DDP (which watches the forward for unused parameters) expects their gradients
            logits = logits + 0.0 * sum(p.sum() for p in self.crf.parameters())
        return logits

    def scores(self, logits: torch.Tensor, ids: torch.Tensor, word_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token tag probabilities (see the module's doc) of a batch's logits; its ids say which tokens are real,
        and `word_ids` which of them are context (CONTEXT_WORD: not tagged, their rows 0)."""
        mask = tagged_tokens(ids, self.pad_id, word_ids)
        logits = logits.float()
        if self.crf is None:
            return logits.softmax(-1) * mask.unsqueeze(-1)
        return self.crf.path_scores(logits, mask)


@HEADS.register("tagger", serves=("token_classification",), reads="token_features")
def tagger(
    feature_dim: int, num_outputs: int, pad_id: int = 0, dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1, crf: bool = False
) -> nn.Module:
    """Tag logits at every token: a linear layer over the token features (after dropout), and a CRF with crf=true."""
    return Tagger(feature_dim, num_outputs, pad_id, dropout, crf)


class TagScores(nn.Module):
    """What a tagging run serves: its network's per-token tag probabilities (`Tagger.scores`)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, ids: torch.Tensor, word_ids: torch.Tensor | None = None, **side: torch.Tensor) -> torch.Tensor:
        return self.network.head.scores(self.network(ids, **side), ids, word_ids)


def tagged_tokens(ids: torch.Tensor, pad_id: int, word_ids: torch.Tensor | None) -> torch.Tensor:
    """(N, L) True at the tokens a tagger tags: the real ones, but a sentence's context's (CONTEXT_WORD)."""
    real = ids != pad_id
    return real if word_ids is None else real & (word_ids != CONTEXT_WORD)


# --------------------------------------------------------------------------- the loss


class TaggingLoss:
    """Cross-entropy over the labelled tokens, or with a CRF head the CRF's negative log-likelihood of the tags of
    every real token (per token). Holds the head it trains (not as a module: its weights are the network's)."""

    def __init__(self, head: nn.Module, label_smoothing: float):
        self.head, self.label_smoothing = head, label_smoothing

    def __call__(self, logits: torch.Tensor, tags: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        crf = getattr(self.head, "crf", None)
        if crf is not None:  # every real token has a tag (`token_tags`), but a sentence's context's: IGNORED
            return crf.nll(logits.float(), tags, (ids != self.head.pad_id) & (tags != IGNORED))
        counted = tags != IGNORED
        if not counted.any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits[counted].float(), tags[counted], label_smoothing=self.label_smoothing)


@LOSSES.register(serves=("token_classification",))
def tagging_loss(head: nn.Module, label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0) -> TaggingLoss:
    """Cross-entropy over each word's tag at its first subword (or every subword); a CRF head's sequence likelihood."""
    if label_smoothing and getattr(head, "crf", None) is not None:
        raise ConfigError("loss.label_smoothing: a CRF head is trained on its sequence likelihood, which takes no smoothing; set it to 0")
    return TaggingLoss(head, label_smoothing)


# --------------------------------------------------------------------------- words and tokens


def first_subwords(word_ids: torch.Tensor) -> torch.Tensor:
    """(N, L) True at each word's first token."""
    before = F.pad(word_ids[:, :-1], (1, 0), value=-1)
    return (word_ids >= 0) & (word_ids != before)


def token_tags(
    tags: Sequence[torch.Tensor],
    word_ids: torch.Tensor,
    inside: torch.Tensor,
    *,
    all_subwords: bool,
    specials: int | None,
    begin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each token's tag (N, L): its word's at the word's first subword; at the other subwords the word's inside tag
    (`inside`: tag -> its I- tag) with `all_subwords`, else IGNORED; `specials` (or IGNORED) at the tokens of no word
    ([CLS], [SEP], and padding, which the loss masks); IGNORED at a sentence's context (CONTEXT_WORD). With `begin`
    (tag -> its B- tag; a CRF's labels, one at every token), an I- token that follows no token of its type becomes
    B-: the token sequence stays valid IOB2 where a word without a token, or a cut at the left, took away an entity's
    beginning."""
    padded = nn.utils.rnn.pad_sequence(list(tags), batch_first=True, padding_value=0) if len(tags) else word_ids.new_zeros(0, 1)
    of_word = padded.gather(1, word_ids.clamp_min(0).clamp_max(max(padded.shape[1] - 1, 0)))
    first = first_subwords(word_ids)
    rest = inside.to(word_ids.device)[of_word] if all_subwords else torch.full_like(of_word, IGNORED)
    out = torch.where(first, of_word, torch.where(word_ids >= 0, rest, torch.full_like(of_word, IGNORED if specials is None else specials)))
    out = out.masked_fill(word_ids == CONTEXT_WORD, IGNORED)  # a sentence's context is read, never tagged
    if begin is not None:
        begin = begin.to(out.device)
        starts = begin[out.clamp_min(0)]
        before = F.pad(out[:, :-1], (1, 0), value=specials if specials is not None else 0).clamp_min(0)
        # I-X (its own B- differs from it) after a tag whose B- is not X's: an entity's first token
        out = torch.where((out >= 0) & (starts != out) & (begin[before] != starts), starts, out)
    return out


def word_tags(scores: torch.Tensor, word_ids: torch.Tensor, words: Sequence[int], outside: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each text's tag per word (`words`: how many it has) and its score, read at the word's first subword; a word
    without a token (cut off by max_length) is `outside` at score 0."""
    best, chosen = scores.float().max(-1)
    first = first_subwords(word_ids)
    out = []
    for i, count in enumerate(words):
        tags, confidence = torch.full((count,), outside, dtype=torch.long), torch.zeros(count)
        positions = first[i].nonzero().flatten().cpu()
        read = word_ids[i, positions].cpu()
        kept = read < count
        tags[read[kept]] = chosen[i, positions[kept]].cpu()
        confidence[read[kept]] = best[i, positions[kept]].cpu()
        out.append((tags, confidence))
    return out


# --------------------------------------------------------------------------- metrics


def entity_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The entities (type, first word, end word exclusive) of a tag sequence, as conlleval reads it: an entity begins
    at B-X, or at I-X after O or another type, and ends before O, B- or another type."""
    spans, start, kind = [], 0, None
    for i, tag in enumerate([*tags, OUTSIDE]):
        current = entity_type(tag)
        if kind is not None and (tag == OUTSIDE or tag.startswith("B-") or current != kind):
            spans.append((kind, start, i))
            kind = None
        if current is not None and kind is None:
            start, kind = i, current
    return spans


@dataclass
class EntityCounts:
    """Entities found, true and both (exact span and type), per type, and words tagged right."""

    found: dict[str, int]
    true: dict[str, int]
    correct: dict[str, int]
    words: int = 0
    words_right: int = 0
    words_unread: int = 0  # cut off by max_length: predicted O

    def add(self, truth: Sequence[str], guess: Sequence[str]) -> None:
        want, got = set(entity_spans(truth)), set(entity_spans(guess))
        for counts, spans in ((self.true, want), (self.found, got), (self.correct, want & got)):
            for kind, _, _ in spans:
                counts[kind] = counts.get(kind, 0) + 1
        self.words += len(truth)
        self.words_right += sum(a == b for a, b in zip(truth, guess, strict=True))

    def scores(self) -> dict[str, Any]:
        def prf(correct: int, found: int, true: int) -> tuple[float, float, float]:
            precision, recall = correct / found if found else 0.0, correct / true if true else 0.0
            return precision, recall, 2 * precision * recall / (precision + recall) if precision + recall else 0.0

        total = (sum(self.correct.values()), sum(self.found.values()), sum(self.true.values()))
        precision, recall, f1 = prf(*total)
        kinds = sorted(set(self.true) | set(self.found))
        per_type = {k: prf(self.correct.get(k, 0), self.found.get(k, 0), self.true.get(k, 0))[2] for k in kinds}
        return {
            "entity_f1": f1,
            "entity_precision": precision,
            "entity_recall": recall,
            "word_accuracy": self.words_right / max(self.words, 1),
            "entities": total[2],
            "per_type_f1": per_type,
        }


def entity_scores(truth: Sequence[Sequence[str]], guess: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Entity-level precision, recall and F1 (micro over entities), per-type F1 and word accuracy of tag sequences."""
    counts = EntityCounts({}, {}, {})
    for want, got in zip(truth, guess, strict=True):
        counts.add(want, got)
    return counts.scores()


# --------------------------------------------------------------------------- the task


@TASKS.register("token_classification")
@dataclass
class TokenClassification(Task):
    """A tag per word (named entities): a linear head (optionally with a CRF) over the token features, each word's
    tag at its first subword; entity-level F1, precision and recall, per-type F1."""

    label_all_subwords: bool = False  # a word's other subwords learn its inside tag too (not only its first)

    head = "tagger"
    loss = "tagging_loss"
    serves = "token_classification"
    target_kind = "class_per_word"
    selection = Selection("val_entity_f1", higher_is_better=True)
    validation_metrics: ClassVar[Mapping[str, bool]] = {
        f"val_{name}": True for name in ("entity_f1", "entity_precision", "entity_recall", "word_accuracy")
    }
    output = "tag_scores"
    exported_as = "tagger"
    augmentation = "none"  # deleting or cropping tokens would move them off their words
    minimum_agreement: ClassVar[Mapping[str, float]] = {"token_tag_agreement": 0.999}
    compares_values = False  # a CRF path near a tie may take another tag: parity counts tags
    pseudo_labels = True  # self-training on untagged sentences (`pseudo_label_loss`)
    pseudo_labels_per_sample = False

    def __post_init__(self) -> None:
        self._use_tags(())
        self.pad_id = 0  # the training texts' (`fit`): what `prepare` cuts
        self.sequence_loss = False  # the head has a CRF: every real token is labelled

    def num_outputs(self, data: Samples) -> int:
        return data.num_classes

    def breaking_effects(self) -> frozenset[str]:
        return frozenset({"crop", "deletion"})

    def fit(self, train: Samples) -> dict[str, Any]:
        self._use_tags(train.classes)
        self.pad_id = train.tokenization.pad_id
        return {"tags": list(self.tags)}

    def load_fitted(self, state: dict[str, Any]) -> None:
        self._use_tags(state.get("tags", ()))

    def initialize(self, network: nn.Module) -> None:
        crf = getattr(network.head, "crf", None)
        self.sequence_loss = crf is not None
        if crf is not None:
            crf.allow_iob2(self.tags)

    @property
    def outside(self) -> int:
        return self.tags.index(OUTSIDE)

    def _use_tags(self, tags: Sequence[str]) -> None:
        """The tag list, and once for every step: each tag's I- form (B-X -> I-X) and B- form (I-X -> B-X)."""
        self.tags = tuple(tags)
        lookup = {tag: i for i, tag in enumerate(self.tags)}
        self.inside = torch.tensor([lookup.get("I-" + t[2:], i) if t.startswith("B-") else i for i, t in enumerate(self.tags)])
        self.begin = torch.tensor([lookup.get("B-" + t[2:], i) if t.startswith("I-") else i for i, t in enumerate(self.tags)])

    def collate(self, targets: TargetList) -> list[torch.Tensor]:
        return list(targets)

    def prepare(self, batch: Batch) -> Batch:
        """The batch cut to its longest text (`cut_to_longest`)."""
        ids, side = cut_to_longest(batch.inputs[0], batch.side, self.pad_id)
        return Batch((ids,), batch.targets, batch.extras, side)

    def training_loss(self, criterion: Any, outputs: torch.Tensor, batch: Batch, network: nn.Module | None = None) -> torch.Tensor:
        labels = token_tags(
            self.collate(batch.targets),
            batch.side["word_ids"],
            self.inside,
            all_subwords=self.label_all_subwords or self.sequence_loss,
            specials=self.outside if self.sequence_loss else None,
            begin=self.begin if self.sequence_loss else None,
        )
        return criterion(outputs, labels, batch.inputs[0])

    def pseudo_label_loss(
        self,
        network: nn.Module,
        forward: nn.Module,
        weak: torch.Tensor,
        strong: torch.Tensor,
        side: dict[str, torch.Tensor],
        threshold: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-training on untagged sentences: the tags predicted for the weak view are the targets of the strong one
        (which masks tokens, never moves them). With a CRF, a sentence counts whole, when every token of its Viterbi
        path has a marginal probability of at least `threshold`, through the CRF's likelihood; without, each token
        that the labelled loss reads (a word's first subword, or all its subwords with `label_all_subwords`) counts
        when its softmax passes it, through cross-entropy. What passed: the sentences, or without a CRF the tokens."""
        weak, side = cut_to_longest(weak, side, self.pad_id)
        strong, word_ids = strong[:, : weak.shape[1]], side["word_ids"]
        real = tagged_tokens(weak, self.pad_id, word_ids)
        crf = getattr(network.head, "crf", None)
        with torch.no_grad():
            logits = forward(weak).float()
            if crf is not None:
                tags = crf.viterbi(logits, real)
                confidence = crf.marginals(logits, real).gather(2, tags.unsqueeze(-1)).squeeze(-1)
            else:
                confidence, tags = logits.softmax(-1).max(-1)
            read = real if crf is not None else (word_ids >= 0 if self.label_all_subwords else first_subwords(word_ids))
            sure = (confidence >= threshold) & read
        outputs = forward(strong).float()
        if crf is not None:
            passed = (sure | ~real).all(1) & real.any(1)
            loss = crf.nll(outputs[passed], tags[passed], real[passed]) * passed.float().mean()
            return loss, passed
        per_token = F.cross_entropy(outputs.transpose(1, 2), tags, reduction="none")
        return (per_token * sure).sum() / read.sum().clamp_min(1), sure[read]

    def tag(self, model: nn.Module, data: Samples, batch_size: int) -> tuple[list[list[str]], list[list[str]], int]:
        """(true tags, predicted tags) of every text's words as tag names, and how many words no token reached."""
        modality, names = modality_of(data), self.tags or tuple(data.classes)
        truth, guess, unread = [], [], 0
        outside = names.index(OUTSIDE)
        pad_id = data.tokenization.pad_id
        by_length = text_lengths(data.inputs, pad_id).argsort(stable=True)  # batches of like lengths: little padding to cut
        # every rank tags the whole split, in length order (the counts do not depend on the order)
        for inputs, targets, side in iterate_batches(data, batch_size, order=by_length, with_side=True):
            length = longest_text(inputs, pad_id)
            word_ids = side["word_ids"][:, :length]
            scores = model(modality.model_input(inputs[:, :length], data), word_ids=word_ids)
            counts = [len(t) for t in targets]
            for want, (got, _) in zip(targets, word_tags(scores, word_ids, counts, outside), strict=True):
                truth.append([names[i] for i in want.tolist()])
                guess.append([names[i] for i in got.tolist()])
            unread += sum(counts) - int(first_subwords(word_ids).sum())
        return truth, guess, unread

    def served(self, network: nn.Module) -> nn.Module:
        return TagScores(network)

    def validate(self, network: nn.Module, val: Samples, batch_size: int) -> dict[str, float]:
        scores = entity_scores(*self.tag(self.served(network), val, batch_size)[:2])
        return {f"val_{name}": scores[name] for name in ("entity_f1", "entity_precision", "entity_recall", "word_accuracy")}

    def evaluate(self, model: nn.Module, test: Samples, batch_size: int, run: Run) -> Evaluation:
        truth, guess, unread = self.tag(model, test, batch_size)
        scores = entity_scores(truth, guess)
        per_type = scores.pop("per_type_f1")
        return Evaluation({**scores, "words_unread": unread}, {"per_type_f1": per_type})

    def compare(self, expected: torch.Tensor, actual: torch.Tensor) -> agreement.Counts:
        """The tag of every real token (rows of padding are all 0)."""
        real = expected.sum(-1) > 0
        same = (expected.argmax(-1) == actual.argmax(-1))[real]
        return {"token_tag_agreement": (int(same.sum()), same.numel())}

    def decode(
        self, outputs: torch.Tensor, fitted: Mapping[str, Any], top_k: int = 1, batch: ReadBatch | None = None
    ) -> list[dict[str, Any]]:
        """Each text's entities: for a text given whole, its entities' text, type, character offsets and score (the
        mean of its words'); for a sentence given as words, a tag per word and the entities' word spans. Words that
        max_length cut off are counted (`unread_words`): they are tagged O."""
        from transferctl.modalities.text import tokenization_of

        names = list(fitted["classes"])
        if batch is None:
            return [{"tags": [names[i] for i in row.argmax(-1)[row.sum(-1) > 0].tolist()]} for row in outputs]
        texts = list(batch.samples.texts)
        _, _, encodings = tokenization_of(fitted).encode(texts, with_encodings=True)  # the tokens the model read
        spans = [split_words(text) if isinstance(text, str) else None for text in texts]
        word_ids = [_words_by_offsets(e, s) if s is not None else e.word_ids for e, s in zip(encodings, spans, strict=True)]
        counts = [len(text) if s is None else len(s) for text, s in zip(texts, spans, strict=True)]
        ids = torch.tensor([[-1 if w is None else w for w in row] for row in word_ids], dtype=torch.long)
        records = []
        for i, (tags, confidence) in enumerate(word_tags(outputs, ids, counts, names.index(OUTSIDE))):
            unread = counts[i] - len({w for w in word_ids[i] if w is not None})
            records.append(_record(texts[i], spans[i], [names[t] for t in tags.tolist()], confidence.tolist(), unread))
        return records

    def card(self, data: Samples) -> dict[str, Any]:
        room = max((text.room for text in getattr(data, "texts", ()) if isinstance(text, SentenceInContext)), default=0)
        context = {
            "document_context": (
                f"trained reading each sentence with up to {room} tokens of its document on each side, untagged; every "
                "token given is tagged, so give a sentence with its neighbouring sentences to tag it in context"
            )
        }
        return {
            **(context if room else {}),
            "classes": list(data.classes),
            "output_meaning": (
                "(N, tokens, tags) tag probabilities per token (with a CRF head: the Viterbi path's tag at its marginal "
                "probability, 0 elsewhere); rows of padding are 0"
            ),
            "word_alignment": (
                "a word's tag is read at its first subword token (the tokenizer's word_ids); words cut off by max_length "
                "have no token and are tagged O"
            ),
        }


# a text given whole is split into words as CoNLL splits them: abbreviations (U.S.), numbers (3.5, 1-0) and
# hyphenated words whole, a possessive 's apart, any other punctuation mark a word of its own
WORD = re.compile(r"(?:[^\W\d_]\.){2,}|\d+(?:[.,:/-]\d+)+|\w+(?:[-'’](?!s\b)\w+)*|['’]s\b|[^\w\s]")


def split_words(text: str) -> list[tuple[int, int]]:
    """The character spans of a text's words, split as CoNLL's sentences are."""
    return [match.span() for match in WORD.finditer(text)]


def _words_by_offsets(encoding: Any, spans: list[tuple[int, int]]) -> list[int | None]:
    """Each token's word among `spans` (None for special tokens and padding): the word its first character is in."""
    starts = [start for start, _ in spans]
    out = []
    for word, (start, end) in zip(encoding.word_ids, encoding.offsets, strict=True):
        at = bisect.bisect_right(starts, start) - 1
        out.append(at if word is not None and end > start and at >= 0 and start < spans[at][1] else None)
    return out


def _record(text: Any, spans: list[tuple[int, int]] | None, tags: list[str], confidence: list[float], unread: int) -> dict[str, Any]:
    record: dict[str, Any] = {}
    if spans is not None:
        entities = []
        for kind, first, end in entity_spans(tags):
            start, stop = spans[first][0], spans[end - 1][1]
            entities.append({"text": text[start:stop], "type": kind, "start": start, "end": stop, "score": _mean(confidence[first:end])})
        record["entities"] = entities
    else:
        record["tags"] = tags
        record["entities"] = [
            {"text": " ".join(text[first:end]), "type": kind, "words": [first, end], "score": _mean(confidence[first:end])}
            for kind, first, end in entity_spans(tags)
        ]
    if unread:
        record["unread_words"] = unread
    return record


def _mean(scores: list[float]) -> float:
    return round(sum(scores) / len(scores), 4)
