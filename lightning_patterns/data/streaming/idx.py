"""Stream MNIST-style IDX files (raw or gzip) from any fsspec URL, decoding incrementally.

The files are read in blocks through retried range requests (see :class:`RemoteReader`), gzip is
decompressed on the fly, and samples are decoded ``chunk_samples`` at a time: no local copy is made and the
file is never held in memory whole. This is the streaming counterpart of ``tfio.IODataset.from_mnist``.

IDX layout (big-endian): two zero bytes, a dtype code (``0x08`` = unsigned byte), the number of dimensions,
one 32-bit size per dimension, then the values. Images files have magic ``0x00000803`` (count, rows,
columns) and labels files ``0x00000801`` (count).
"""

from __future__ import annotations

import dataclasses
import io
import struct
from collections.abc import Iterator, Mapping
from typing import IO, Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lightning_patterns.data.remote import FetchStats, RemoteReader, RetryPolicy
from lightning_patterns.data.remote.stream import GZIP_MAGIC

__all__ = ["IDXDataset", "IDXHeader", "read_idx_header"]

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
# IDX dtype codes and the numpy dtypes they store (big-endian where it matters).
_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclasses.dataclass(frozen=True)
class IDXHeader:
    """The header of an IDX file.

    Args:
        dtype_code: The IDX type byte (``0x08`` for unsigned bytes).
        shape: The size of every dimension, the number of samples first.
    """

    dtype_code: int
    shape: tuple[int, ...]

    @property
    def magic(self) -> int:
        """The 32-bit magic number, e.g. ``0x00000803`` for an images file."""
        return (self.dtype_code << 8) | len(self.shape)

    @property
    def header_size(self) -> int:
        """Bytes before the first value."""
        return 4 + 4 * len(self.shape)

    @property
    def count(self) -> int:
        """The number of samples (the first dimension)."""
        return self.shape[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample, e.g. ``(28, 28)``."""
        return self.shape[1:]

    @property
    def dtype(self) -> np.dtype[Any]:
        """The numpy dtype of the values."""
        return np.dtype(_IDX_DTYPES[self.dtype_code])

    @property
    def sample_bytes(self) -> int:
        """Bytes per sample."""
        return int(np.prod(self.sample_shape, dtype=np.int64)) * self.dtype.itemsize


def read_idx_header(fileobj: IO[bytes] | io.BufferedIOBase, *, name: str = "IDX file") -> IDXHeader:
    """Read and check the header of an IDX file, leaving ``fileobj`` at the first value.

    Args:
        fileobj: A binary file object at the start of the (decompressed) file.
        name: How to call the file in error messages, e.g. its URL.

    Returns:
        The header.

    Raises:
        ValueError: The file does not start with a valid IDX header.

    Example:
        >>> import io
        >>> read_idx_header(io.BytesIO(bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28])))
        IDXHeader(dtype_code=8, shape=(2, 28, 28))
    """
    head = _read_exact(fileobj, 4, name, "its IDX magic number")
    magic = struct.unpack(">I", head)[0]
    if head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES or head[3] == 0:
        hint = " It looks gzip-compressed: name it *.gz or open it with gzip." if head[:2] == GZIP_MAGIC else ""
        raise ValueError(
            f"{name} is not an IDX file: magic number 0x{magic:08x}, expected 0x0000TTNN with a type byte TT in "
            f"{sorted(hex(code) for code in _IDX_DTYPES)} and NN >= 1 dimensions.{hint}"
        )
    ndim = head[3]
    shape = struct.unpack(f">{ndim}I", _read_exact(fileobj, 4 * ndim, name, "its IDX dimensions"))
    return IDXHeader(dtype_code=head[2], shape=tuple(int(s) for s in shape))


def _read_exact(fileobj: IO[bytes] | io.BufferedIOBase, n: int, name: str, what: str) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < n:
        part = fileobj.read(n - got)
        if not part:
            raise ValueError(f"{name} ends after {got} bytes, before {what} ({n} bytes); the file is truncated.")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _readinto_exact(fileobj: io.BufferedIOBase, buf: bytearray) -> int:
    """Fill ``buf`` from ``fileobj``; returns how many bytes were read (fewer only at end of file)."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = fileobj.readinto(view[got:])
        if not n:
            break
        got += n
    return got


class IDXDataset(IterableDataset[dict[str, torch.Tensor]]):
    """An iterable dataset of ``{"image": uint8 (rows, cols), "label": int64 0-d}`` streamed from IDX files.

    Works with MNIST and Fashion-MNIST as published (``*-idx3-ubyte.gz`` / ``*-idx1-ubyte.gz``) on any fsspec
    URL: HTTP(S), S3, GCS, ``memory://``, local files. Gzip is detected from the ``.gz`` suffix or the gzip
    magic bytes. Reads are retried and resume from the offset reached, as in :class:`RemoteReader`.

    Under a DataLoader with several workers, worker ``w`` of ``n`` yields the chunks ``w, w + n, ...`` so no
    sample is yielded twice. Iterating the dataset also feeds a shard writer, which accepts any iterable of
    dict samples.

    Args:
        images_url: URL of the images file (magic ``0x00000803``).
        labels_url: URL of the labels file (magic ``0x00000801``).
        storage_options: Passed unchanged to fsspec for both URLs.
        chunk_samples: Samples decoded per step; bounds the memory held besides one read block.
        retry: Retry policy for the remote reads; ``RetryPolicy()`` when ``None``.
        block_size: Bytes per range request.
        stats: Counters of remote bytes, requests and retries; a new :class:`FetchStats` when ``None``.

    Example:
        >>> import fsspec
        >>> with fsspec.open("memory://doc/idx/images", "wb") as f:
        ...     _ = f.write(bytes([0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3, 4]))
        >>> with fsspec.open("memory://doc/idx/labels", "wb") as f:
        ...     _ = f.write(bytes([0, 0, 8, 1, 0, 0, 0, 1, 7]))
        >>> dataset = IDXDataset("memory://doc/idx/images", "memory://doc/idx/labels")
        >>> [(s["image"].tolist(), int(s["label"])) for s in dataset], len(dataset)
        ([([[1, 2], [3, 4]], 7)], 1)
    """

    def __init__(
        self,
        images_url: str,
        labels_url: str,
        storage_options: Mapping[str, Any] | None = None,
        chunk_samples: int = 1024,
        *,
        retry: RetryPolicy | None = None,
        block_size: int = 2**20,
        stats: FetchStats | None = None,
    ) -> None:
        super().__init__()
        for arg, value in (("images_url", images_url), ("labels_url", labels_url)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"IDXDataset({arg}={value!r}) must be a non-empty URL, e.g. 'https://host/file.gz'.")
        for arg, number in (("chunk_samples", chunk_samples), ("block_size", block_size)):
            if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                raise ValueError(f"IDXDataset({arg}={number!r}) must be a positive integer.")
        self.images_url = images_url
        self.labels_url = labels_url
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        self.chunk_samples = chunk_samples
        self.block_size = block_size
        self.stats = stats if stats is not None else FetchStats()
        self.retry = retry if retry is not None else RetryPolicy()
        self._images_reader = RemoteReader(images_url, self.storage_options, retry=self.retry, stats=self.stats)
        self._labels_reader = RemoteReader(labels_url, self.storage_options, retry=self.retry, stats=self.stats)
        self._count: int | None = None

    def __len__(self) -> int:
        """The number of samples, from the labels file's header (read once)."""
        if self._count is None:
            with self._open(self._labels_reader, self.labels_url) as labels:
                self._count = self._check_header(read_idx_header(labels, name=self.labels_url), LABELS_MAGIC).count
        return self._count

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for images, labels in self._iter_chunks(self.chunk_samples):
            for image, label in zip(images, labels, strict=True):
                yield {"image": image, "label": label}

    def iter_batches(self, batch_size: int, *, drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Yield whole batches, decoded straight from the stream without per-sample work.

        Args:
            batch_size: Samples per batch.
            drop_last: Drop a final batch smaller than ``batch_size``.

        Yields:
            ``{"image": uint8 (batch, rows, cols), "label": int64 (batch,)}``.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"iter_batches(batch_size={batch_size!r}) must be a positive integer.")
        for images, labels in self._iter_chunks(batch_size):
            if drop_last and len(labels) < batch_size:
                return
            yield {"image": images, "label": labels}

    def close(self) -> None:
        """Release the remote connections; iterating again opens new ones."""
        self._images_reader.close()
        self._labels_reader.close()

    def __enter__(self) -> IDXDataset:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _open(self, reader: RemoteReader, url: str) -> io.BufferedIOBase:
        return reader.open(url, block_size=self.block_size, compression="infer")

    def _check_header(self, header: IDXHeader, expected: int) -> IDXHeader:
        url, kind, example = (
            (self.images_url, "images", "train-images-idx3-ubyte.gz")
            if expected == IMAGES_MAGIC
            else (self.labels_url, "labels", "train-labels-idx1-ubyte.gz")
        )
        if header.magic != expected:
            raise ValueError(
                f"{url} is not an IDX {kind} file: magic number 0x{header.magic:08x}, expected 0x{expected:08x} "
                f"(unsigned bytes, {expected & 0xFF} dimension(s)). Pass the {kind} file (e.g. {example}) as "
                f"{kind}_url."
            )
        return header

    def _iter_chunks(self, chunk: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info()
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        with (
            self._open(self._images_reader, self.images_url) as images,
            self._open(self._labels_reader, self.labels_url) as labels,
        ):
            image_header = self._check_header(read_idx_header(images, name=self.images_url), IMAGES_MAGIC)
            label_header = self._check_header(read_idx_header(labels, name=self.labels_url), LABELS_MAGIC)
            if image_header.count != label_header.count:
                raise ValueError(
                    f"The images file {self.images_url} holds {image_header.count} samples but the labels file "
                    f"{self.labels_url} holds {label_header.count}; pass the matching pair (e.g. both train or "
                    "both t10k files)."
                )
            self._count = label_header.count
            rows_cols = image_header.sample_shape
            per_image = image_header.sample_bytes
            done = 0
            for index, start in enumerate(range(0, image_header.count, chunk)):
                n = min(chunk, image_header.count - start)
                if index % num_workers != worker_id:
                    # Another worker yields this chunk; skip without decoding (a seek on raw files).
                    images.seek(n * per_image, io.SEEK_CUR)
                    labels.seek(n, io.SEEK_CUR)
                    done += n
                    continue
                image_buf = bytearray(n * per_image)
                label_buf = bytearray(n)
                got_images = _readinto_exact(images, image_buf) // per_image
                got_labels = _readinto_exact(labels, label_buf)
                if got_images < n or got_labels < n:
                    raise ValueError(
                        f"The IDX files end early: their headers announce {image_header.count} samples, but "
                        f"{self.images_url} holds {done + got_images} and {self.labels_url} {done + got_labels}; "
                        "a download or upload was cut short, so copy the files again."
                    )
                done += n
                image_tensor = torch.frombuffer(image_buf, dtype=torch.uint8).view(n, *rows_cols)
                label_tensor = torch.frombuffer(label_buf, dtype=torch.uint8).to(torch.int64)
                yield image_tensor, label_tensor
