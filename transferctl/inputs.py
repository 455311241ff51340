"""What `predict` and `embed` read: the inputs a command line or a caller names, resolved into one ordered list.

For a model of files (images, audio) an input is a file; a folder (its files of the modality's types, recursively, in
sorted order); a glob or brace pattern; a tar shard (its members of the modality's types, read by byte offset as the
stream pipeline reads `data pack`'s shards); a list file (`--list`: one path a line) or `-` (standard input, likewise).
For a text model an input is a text: given itself (`--text`, Python strings), a line of a list or of standard input,
a line of a .txt file, or a row of a CSV or JSONL file (the text columns the run was trained on, joined as its data
set joined them).

Inputs named on the command line must exist and be of the modality (a usage error otherwise, before anything is
read); a path listed in a file that cannot be read is that input's failure, reported in its record.
"""

from __future__ import annotations

import glob
import os
import sys
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from braceexpand import braceexpand

from transferctl.errors import UsageError
from transferctl.modalities import Modality

PATTERN_CHARACTERS = set("*?[{")


@dataclass(frozen=True)
class Member:
    """A file inside a tar shard, read by its byte offset (one seek)."""

    shard: str
    name: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.shard, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(self.size)
        if len(data) != self.size:
            raise OSError(f"the shard ends inside {self.name} (truncated)")
        return data


@dataclass(frozen=True, slots=True)
class Input:
    """One input: what its record calls it (`id`: a file's path, `shard.tar:member`, or the text), where it is read
    from (`source`: None for the file at `id`, a tar member, or the text), and for a text its line (in its file,
    the list, standard input, or among the --text options). Slotted and path-as-string: a folder of a million files
    is a million of these."""

    id: str
    source: Member | str | tuple[str, ...] | None = None  # a text, or a sentence's words
    line: int | None = None
    file: str | None = None

    def open(self) -> Path | bytes | str | tuple[str, ...]:
        """What the modality's reader takes: a path, a member's bytes, or the text (or its words)."""
        if isinstance(self.source, Member):
            return self.source.read()
        return Path(self.id) if self.source is None else self.source

    @property
    def stem(self) -> str:
        """A short name for the files made from it (a mask)."""
        if isinstance(self.source, Member):
            return Path(self.source.name).stem
        if self.source is None:
            return Path(self.id).stem
        return f"line{self.line}" if self.line is not None else "text"

    def describe(self) -> dict[str, Any]:
        """The fields that name it in a record."""
        named: dict[str, Any] = {"input": self.id}
        if self.file is not None:
            named["file"] = self.file
        if self.line is not None:
            named["line"] = self.line
        return named


def resolve(
    arguments: Sequence[str | Path],
    modality: Modality,
    *,
    list_file: Path | None = None,
    texts: Sequence[str] = (),
    stdin: IO[str] | None = None,
    text_columns: Sequence[str] = ("text",),
) -> list[Input]:
    """Every input, in order: `arguments` (paths, patterns, `-` as Paths or strings; for a text model a string is a
    text, and a Path a file or folder of texts), then the `--list` file's lines, then `texts`. A usage error for an
    argument that names nothing, a folder or pattern without inputs, a file of another modality, or no inputs."""
    inputs: list[Input] = []
    reader = _TextInputs(modality, text_columns) if modality.reads_texts else _FileInputs(modality)
    for argument in arguments:
        if modality.reads_texts and isinstance(argument, str):  # a Python caller's text (the command line passes Paths)
            inputs.append(Input(argument, argument, line=len(inputs) + 1))
        elif str(argument) == "-":
            inputs += reader.listed(_lines(stdin or sys.stdin), "standard input")
        else:
            inputs += reader.named(str(argument))
    if list_file is not None:
        try:
            content = Path(list_file).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--list {list_file}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
        inputs += reader.listed(content.splitlines(), str(list_file))
    if texts and not modality.reads_texts:
        raise UsageError(f"--text: the model reads {modality_noun(modality)}, not texts; pass files")
    inputs += [Input(text, text, line=i) for i, text in enumerate(texts, start=1)]
    if not inputs:
        raise UsageError(f"no inputs: name {modality_noun(modality)} (files, folders, patterns, --list FILE or - for standard input)")
    return inputs


def _lines(stream: IO[str]) -> list[str]:
    return stream.read().splitlines()


def modality_noun(modality: Modality) -> str:
    from transferctl.registry import MODALITIES

    name = next((e.name for e in MODALITIES if isinstance(modality, e.fn)), "inputs")
    return {"image": "images", "audio": "recordings", "text": "texts"}.get(name, f"{name} files")


def _other_modality(suffix: str, modality: Modality) -> str | None:
    """The registered modality whose files have `suffix`, other than `modality`."""
    from transferctl.modalities import modality_named
    from transferctl.registry import MODALITIES

    for entry in MODALITIES:
        other = modality_named(entry.name)
        if type(other) is not type(modality) and suffix in other.file_types:
            return entry.name
    return None


class _FileInputs:
    """Inputs of a model of files: paths, folders, patterns and tar shards."""

    def __init__(self, modality: Modality):
        self.modality = modality
        self.suffixes = tuple(s.lower() for s in modality.file_types)

    def named(self, argument: str) -> list[Input]:
        path = Path(argument).expanduser()
        if path.is_dir():
            found = self._in_folder(path)
            if not found:
                raise UsageError(f"{argument}: the folder holds no {self._kinds()} files; point at the {modality_noun(self.modality)}")
            return found
        if path.is_file():
            return self._file(path, argument)
        if PATTERN_CHARACTERS & set(argument):
            found = [i for m in _matches(argument) for i in (self._in_folder(m) if m.is_dir() else self._file(m, str(m), strict=False))]
            inputs = list({i.id: i for i in found}.values())  # `**` matches folders and their files: each once, where first
            if not inputs:
                raise UsageError(f"{argument}: the pattern matches no {self._kinds()} files; check it (quote it so the shell keeps it)")
            return inputs
        raise UsageError(f"{argument}: no such file or folder")

    def listed(self, lines: Iterable[str], where: str) -> list[Input]:
        """One path a line: each a file of the modality (a missing or unreadable one fails in its record)."""
        inputs = []
        for line in lines:
            path = line.strip()
            if path:
                self._check_suffix(Path(path), f"{where}: {path}")
                inputs.append(Input(path))
        return inputs

    def _file(self, path: Path, name: str, strict: bool = True) -> list[Input]:
        if path.suffix.lower() == ".tar":
            return self._members(path)
        if not strict and path.suffix.lower() not in self.suffixes:
            return []  # a pattern's other files
        self._check_suffix(path, name)
        return [Input(str(path))]

    def _check_suffix(self, path: Path, name: str) -> None:
        suffix = path.suffix.lower()
        if suffix in self.suffixes:
            return
        other = _other_modality(suffix, self.modality)
        reads = modality_noun(self.modality)
        if other is not None:
            raise UsageError(f"{name} is {_article(other)} {other} file, and the model reads {reads}; give it {reads} ({self._kinds()})")
        raise UsageError(f"{name}: not one of the model's file types ({self._kinds()}); it reads {reads}")

    def _in_folder(self, folder: Path) -> list[Input]:
        found = []
        for root, dirs, files in os.walk(folder, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [Path(root) / f for f in files if not f.startswith(".") and Path(f).suffix.lower() in self.suffixes]
        return [Input(str(p)) for p in sorted(found, key=lambda p: p.relative_to(folder).as_posix())]

    def _members(self, shard: Path) -> list[Input]:
        """A tar shard's members of the modality's types, in the order they are stored."""
        members = []
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if member.isfile() and Path(member.name).suffix.lower() in self.suffixes:
                        members.append(Member(str(shard), member.name, member.offset_data, member.size))
        except (tarfile.TarError, OSError, EOFError) as exc:
            if not members:
                raise UsageError(f"{shard}: not a readable tar shard ({exc}); replace it or pack the data again") from None
            # a truncated shard: the members before the damage are read, as the stream pipeline reads them
        if not members:
            raise UsageError(f"{shard}: the shard holds no {self._kinds()} members")
        return [Input(f"{shard}:{m.name}", m) for m in members]

    def _kinds(self) -> str:
        return ", ".join(self.suffixes)


class _TextInputs:
    """Inputs of a text model: texts, and files of texts."""

    def __init__(self, modality: Modality, text_columns: Sequence[str]):
        self.modality, self.text_columns = modality, list(text_columns)
        self.suffixes = tuple(modality.file_types)

    def named(self, argument: str) -> list[Input]:
        path = Path(argument).expanduser()
        if path.is_dir():
            files = sorted(
                (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in self.suffixes and not _hidden(p.relative_to(path))),
                key=lambda p: p.relative_to(path).as_posix(),
            )
            inputs = [i for f in files for i in self._file(f)]
            if not inputs:
                raise UsageError(f"{argument}: the folder holds no texts ({', '.join(self.suffixes)} files); pass texts with --text")
            return inputs
        if path.is_file():
            return self._file(path)
        if PATTERN_CHARACTERS & set(argument):
            inputs = [i for m in dict.fromkeys(_matches(argument)) if m.is_file() for i in self._file(m)]
            if not inputs:
                raise UsageError(f"{argument}: the pattern matches no files of texts; check it (quote it so the shell keeps it)")
            return inputs
        raise UsageError(f"{argument}: no such file or folder; pass a text itself with --text")

    def listed(self, lines: Iterable[str], where: str) -> list[Input]:
        """One text a line."""
        return [Input(text.strip(), text.strip(), line=n) for n, text in enumerate(lines, start=1) if text.strip()]

    def _file(self, path: Path) -> list[Input]:
        from transferctl.data.text import texts_of

        suffix = path.suffix.lower()
        if suffix not in self.suffixes:
            other = _other_modality(suffix, self.modality)
            what = f"{_article(other)} {other} file" if other else "not a file of texts"
            raise UsageError(f"{path} is {what}, and the model reads texts; give {', '.join(self.suffixes)} files or --text")
        return [Input(_named(text), text, line=line, file=str(path)) for line, text in texts_of(path, self.text_columns)]


def _named(text: str | tuple[str, ...]) -> str:
    """What a record calls a text: itself, or its words joined by spaces."""
    return text if isinstance(text, str) else " ".join(text)


def _matches(pattern: str) -> list[Path]:
    """What a glob or brace pattern names, each brace expansion's matches sorted."""
    return [Path(m) for part in braceexpand(pattern) for m in sorted(glob.glob(os.path.expanduser(part), recursive=True))]


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"
