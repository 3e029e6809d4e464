"""The IDX file format (MNIST's): its header, and exact reads of a (decompressed) IDX stream.

IDX layout (big-endian): two zero bytes, a dtype code (``0x08`` = unsigned byte), the number of dimensions,
one 32-bit size per dimension, then the values. Images files have magic ``0x00000803`` (count, rows,
columns) and labels files ``0x00000801`` (count).
"""

from __future__ import annotations

import dataclasses
import io
import struct
from typing import IO, Any

import numpy as np

from lightning_patterns.data.remote.stream import GZIP_MAGIC

__all__ = [
    "IDXHeader",
    "IMAGES_MAGIC",
    "LABELS_MAGIC",
    "check_header",
    "read_exact",
    "read_idx_header",
    "readinto_exact",
]

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
    head = read_exact(fileobj, 4, name, "its IDX magic number")
    magic = struct.unpack(">I", head)[0]
    if head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES or head[3] == 0:
        hint = " It looks gzip-compressed: name it *.gz or open it with gzip." if head[:2] == GZIP_MAGIC else ""
        raise ValueError(
            f"{name} is not an IDX file: magic number 0x{magic:08x}, expected 0x0000TTNN with a type byte TT in "
            f"{sorted(hex(code) for code in _IDX_DTYPES)} and NN >= 1 dimensions.{hint}"
        )
    ndim = head[3]
    shape = struct.unpack(f">{ndim}I", read_exact(fileobj, 4 * ndim, name, "its IDX dimensions"))
    return IDXHeader(dtype_code=head[2], shape=tuple(int(s) for s in shape))


def read_exact(fileobj: IO[bytes] | io.BufferedIOBase, n: int, name: str, what: str) -> bytes:
    """Exactly ``n`` bytes of ``fileobj``, else a ValueError saying that ``name`` ends before ``what``."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        part = fileobj.read(n - got)
        if not part:
            raise ValueError(f"{name} ends after {got} bytes, before {what} ({n} bytes); the file is truncated.")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def readinto_exact(fileobj: io.BufferedIOBase, buf: bytearray) -> int:
    """Fill ``buf`` from ``fileobj``; returns how many bytes were read (fewer only at end of file)."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = fileobj.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def check_header(header: IDXHeader, expected: int, url: str) -> IDXHeader:
    """``header`` if it is an images (``expected=IMAGES_MAGIC``) or labels header, else a ValueError naming ``url``."""
    kind, example = (
        ("images", "train-images-idx3-ubyte.gz")
        if expected == IMAGES_MAGIC
        else ("labels", "train-labels-idx1-ubyte.gz")
    )
    if header.magic != expected:
        raise ValueError(
            f"{url} is not an IDX {kind} file: magic number 0x{header.magic:08x}, expected 0x{expected:08x} "
            f"(unsigned bytes, {expected & 0xFF} dimension(s)). Pass the {kind} file (e.g. {example}) as "
            f"{kind}_url."
        )
    return header
