"""What every source kind is: where a part's input comes from (`spec.source.<kind>`), and, for the
URL lists the filter reads, what every list file's reader gives back.

A source kind (one module beside this one) says whether a spec reads it and describes it to a person.
The stages ask the source what it is, never its name: a URL list (`converts` false) is filtered and
downloaded; a source of samples (`SampleSource`: a dataset on disk, archives, parquet with the images
inside) lists its input shards once into the manifest and reads one, and the convert stage writes each
in the part's output format. The URL list (`urls`) reads its files through a `ListReader` chosen by the file's
name or `source.format` (parquet, csv, tsv, json, jsonl, txt): each opened file gives its columns, its
row count and its record batches, on which the filter runs its conditions as they are read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple, TypeVar

import pyarrow as pa

from ...errors import InputError
from ...spec import PartSpec
from ..formats import Sample

T = TypeVar("T")


class MetadataError(InputError):
    """A metadata file cannot be read as LAION metadata; the message names the file."""


class Refused(NamedTuple):
    """A sample a source read but cannot give an image for (no caption, a member that is not an image):
    counted under `reason` (contract.FAILURE_REASONS), its message naming the input and the member."""

    reason: str
    message: str


class Opened:
    """An input shard open for reading: `columns` (SampleSource.columns) and `samples`; closed on
    leaving its `with`, read whole or not."""

    def __init__(
        self,
        columns: list[pa.Field],
        samples: Iterator[tuple[Sample, bytes | Refused]],
        close: Callable[[], None] | None = None,
    ):
        self.columns, self.samples, self._close = columns, samples, close

    def __enter__(self) -> Opened:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._close is not None:
            self._close()


def scalar_type(kind: pa.DataType) -> bool:
    """A type a sample's metadata column may hold (a number, a flag, a string), as every format writes it."""
    return (
        pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
    )


class Source(ABC):
    """A kind of part input: `spec.source.<name>`."""

    name = ""
    converts = False  # its samples are read and written again (convert), not fetched from URLs

    @abstractmethod
    def selected(self, spec: PartSpec) -> bool:
        """The spec reads this kind."""

    @abstractmethod
    def describe(self, spec: PartSpec) -> str:
        """The input in a few words, for the line a run starts with."""


class SampleSource(Source):
    """A source whose samples (an image's bytes and its caption) are read from its inputs, one input
    shard a Ray task: what output shard N reads is the manifest's entry N, listed once, so that a
    resumed run reads the same input into the same shard."""

    converts = True

    @abstractmethod
    def list_inputs(self, spec: PartSpec) -> list[dict]:
        """The input shards, in order: JSON objects kept in the manifest."""

    @abstractmethod
    def read_input(self, spec: PartSpec, entry: dict) -> Iterator[tuple[Sample, bytes | Refused]]:
        """The samples of one input shard, each with its image's bytes (or why it has none); an input
        that cannot be read raises an InputError naming the input and the member."""

    def columns(self, spec: PartSpec, entry: dict) -> list[pa.Field]:
        """The metadata columns an input's samples carry (their `meta` values, by name), written beside
        the leading columns in every sample's row; none unless the source has columns of its own."""
        return []

    def open_input(self, spec: PartSpec, entry: dict) -> Opened:
        """One input shard, open: its columns and its samples. A source whose columns are known only
        once the input is open (an archive's own annotations member) opens it once for both."""
        return Opened(self.columns(spec, entry), self.read_input(spec, entry))

    def plan_line(self, spec: PartSpec, inputs: list[dict]) -> str:
        """What `laion-operator plan` prints of the inputs."""
        return f"{self.describe(spec)} in {len(inputs)} shards"


def in_order(tasks: Iterator[Callable[[], Any]], workers: int) -> Iterator:
    """The tasks' results in task order, `workers` tasks running at once and at most one more done
    ahead of the caller: memory holds a few tasks' results whatever the number of tasks."""
    with ThreadPoolExecutor(workers, thread_name_prefix="metadata-reader") as pool:
        pending: deque[Future] = deque()
        try:
            for task in tasks:
                pending.append(pool.submit(task))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


class ListFile(ABC):
    """One file of a URL list, open."""

    def __init__(self, url: str):
        self.url = url

    @property
    @abstractmethod
    def columns(self) -> list[str]:
        """The file's column names."""

    @property
    @abstractmethod
    def rows(self) -> int:
        """How many rows the file holds (the shuffle sizes its spill by it: a streamed text file may
        answer an estimate, which only moves the number of spill buckets by a power of two)."""

    @abstractmethod
    def batches(self, columns: list[str], each: Callable[[pa.RecordBatch], T]) -> Iterator[T]:
        """Every batch of the file's `columns` as `each` turns it, in file order; `each` may run on
        reader threads, several at once. A file that turns out unreadable raises MetadataError."""


class ListReader(ABC):
    """A URL list's file format: the names it reads and how it opens one."""

    name = ""
    suffixes: tuple[str, ...] = ()

    @abstractmethod
    def open(self, url: str, header: tuple[str, ...] | None = None) -> ListFile:
        """The file, opened; one that is missing or not in this format raises MetadataError. `header`
        (`source.header`) names the columns of a file without a header line, where the format has one."""

    def no_header(self, url: str, header: tuple[str, ...] | None) -> None:
        """Refuse `source.header` for a format whose files name their own columns."""
        if header is not None:
            raise MetadataError(
                f"{url}: spec.source.header names the columns of csv and tsv files; this file is {self.name}"
            )
