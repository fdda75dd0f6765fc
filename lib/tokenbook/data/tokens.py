"""VQ tokens on disk and in memory: SeiT's token file format, a small VQ tokenizer, storage accounting.

SeiT (ICCV 2023) trains ViTs on VQ token ids instead of pixels. This module holds everything that touches ids
before the model sees them (the reference sheet is ``../shared/papers/seit_tokenadapt.md``, sections 1.1-1.3).

Token file format (the ``IMNET1K-tokens.tar`` release, read by ``datasets.py`` of naver-ai/seit and tokenadapt)
------------------------------------------------------------------------------------------------------------
Three files per split, here named by :func:`token_file_paths`:

- ``<name>-<split>-token.data.bin.gz``: every image's ids, concatenated into *one* byte stream and gzip'd as one
  stream. An id 0..254 is one byte; an id >= 255 is the escape byte 255 followed by ``id - 255``.
- ``<name>-<split>-token.index.npy.gz`` (the data name with ``data.bin`` -> ``index.npy``): a gzip'd ``.npy`` array
  of N+1 byte offsets; record i is ``stream[start[i]:start[i+1]]``. We write int64 (the release's dtype is unknown).
- ``<name>-<split>-label.txt``: one integer class id per line, in record order.

The official decoder walks each record byte by byte: a 255 sets an offset of 255 that is added to the next non-255
byte. Two consequences the reference sheet does not spell out: a second 255 right after an escape is read as
another escape (not as the value 255), so the largest id the format can carry is 255 + 254 = **509**
(:data:`MAX_TOKEN_ID`; the sheet's "510" would need the pair 255 255, which the official decoder swallows); and a
repeated or dangling escape is silently ignored. We decode the whole stream at once with numpy (no per-byte Python
loop), and by default treat those two cases as corruption and raise :class:`TokenFormatError` naming the record
and the byte offset; ``lenient=True`` reproduces the official reader's silent behaviour instead.

An optional ``uint16`` ``.npy`` cache of shape (N, H, W) is memory-mapped on later reads (``cache_path=``).

The VQ tokenizer
----------------
SeiT uses a ViT-VQGAN (256 px -> 32x32 ids, codebook pruned to 391 x 32, cosine nearest-code lookup); its weights are
not usable here. :class:`VQTokenizer` is a small convolutional VQ auto-encoder with the same *quantizer* (both the
encoder output and the codebook rows are L2-normalised, each position takes the id of the nearest code by cosine,
straight-through gradient, ViT-VQGAN's codebook + commitment loss on the normalised vectors), sized for 28x28
images (a 14x14 or 7x7 grid, 391 x 32 codebook by default, so ids above 254 are exercised). As in SeiT, the
classifier side uses the *raw* codebook rows (:meth:`VQTokenizer.export_codebook` writes them as ``codebook.ckpt``).
"""
from __future__ import annotations

import gzip
import io
import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ESCAPE", "MAX_TOKEN_ID", "TokenFormatError", "TokenFilePaths", "TokenSet", "TokenDataset",
    "token_file_paths", "encode_ids", "decode_stream", "write_token_file", "read_token_file", "read_release_split",
    "load_codebook", "save_codebook", "VQTokenizer", "train_tokenizer", "save_tokenizer", "load_tokenizer",
    "tokenize_dataset", "tokenize_images", "decode_tokens", "reconstruction_error", "storage_report",
    "to_uint8_images",
]

PathLike = Union[str, os.PathLike]

#: the escape byte of SeiT's format
ESCAPE = 255
#: largest id the official decoder can read back (255 + 254; see the module docstring)
MAX_TOKEN_ID = 2 * ESCAPE - 1


class TokenFormatError(ValueError):
    """A token file (or stream) that is corrupt, truncated or inconsistent with its index / labels."""


# ----------------------------------------------------------------------------------------------------------
# File names
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenFilePaths:
    """The three files of one split: escape-coded data stream, byte-offset index, labels."""

    data: Path
    index: Path
    labels: Path

    def exist(self) -> bool:
        return self.data.is_file() and self.index.is_file()

    def sizes(self) -> dict[str, int]:
        """On-disk bytes of each file that exists."""
        return {k: getattr(self, k).stat().st_size for k in ("data", "index", "labels") if getattr(self, k).is_file()}


def token_file_paths(root: PathLike, name: str = "imagenet1k", split: str = "train") -> TokenFilePaths:
    """Paths in the release's naming.

    ``{name}-{split}-token.data.bin.gz``, ``{name}-{split}-token.index.npy.gz``, ``{name}-{split}-label.txt``.
    """
    root = Path(root)
    data = root / f"{name}-{split}-token.data.bin.gz"
    return TokenFilePaths(data=data, index=_index_path_for(data), labels=root / f"{name}-{split}-label.txt")


def _index_path_for(data_path: PathLike) -> Path:
    data_path = Path(data_path)
    if "data.bin" not in data_path.name:
        raise TokenFormatError(
            f"{data_path}: cannot derive the index file name (the official rule replaces 'data.bin' by 'index.npy'); "
            "pass index_path= explicitly")
    return data_path.with_name(data_path.name.replace("data.bin", "index.npy"))


# ----------------------------------------------------------------------------------------------------------
# Escape coding (vectorized)
# ----------------------------------------------------------------------------------------------------------
def encode_ids(ids: Union[np.ndarray, torch.Tensor, Sequence]) -> tuple[bytes, np.ndarray]:
    """Escape-code ids into SeiT's byte stream.

    ``ids``: (N, ...) integers in ``0..MAX_TOKEN_ID``; each record is ``ids[i]`` flattened row-major.
    Returns ``(stream, offsets)`` with ``offsets`` the int64 array of N+1 byte start offsets.
    """
    arr = ids.detach().cpu().numpy() if torch.is_tensor(ids) else np.asarray(ids)
    if arr.ndim < 2:
        raise ValueError(f"ids must have shape (N, tokens...) with one record per row, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {arr.dtype}")
    flat = arr.reshape(arr.shape[0], -1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() > MAX_TOKEN_ID):
        bad = np.argwhere((flat < 0) | (flat > MAX_TOKEN_ID))[0]
        raise ValueError(
            f"id {flat[tuple(bad)]} at record {bad[0]}, position {bad[1]} is outside 0..{MAX_TOKEN_ID}, the range "
            f"SeiT's escape format can store (one escape byte {ESCAPE} + one byte); use a codebook of at most "
            f"{MAX_TOKEN_ID + 1} entries")
    nbytes = 1 + (flat >= ESCAPE)                                   # bytes per id
    rec_bytes = nbytes.sum(axis=1)
    offsets = np.zeros(flat.shape[0] + 1, dtype=np.int64)
    np.cumsum(rec_bytes, out=offsets[1:])
    ends = np.cumsum(nbytes.ravel())
    starts = ends - nbytes.ravel()
    out = np.empty(int(offsets[-1]), dtype=np.uint8)
    v = flat.ravel()
    big = v >= ESCAPE
    out[starts[~big]] = v[~big]
    out[starts[big]] = ESCAPE
    out[starts[big] + 1] = v[big] - ESCAPE
    return out.tobytes(), offsets


def _record_of(offsets: np.ndarray, byte: int) -> int:
    return int(np.searchsorted(offsets, byte, side="right") - 1)


def decode_stream(
    stream: Union[bytes, bytearray, memoryview, np.ndarray],
    offsets: np.ndarray,
    tokens_per_image: Optional[int] = None,
    lenient: bool = False,
    source: str = "token stream",
) -> np.ndarray:
    """Decode a whole escape-coded stream into an (N, T) ``uint16`` array, vectorized.

    ``offsets``: N+1 byte offsets. ``tokens_per_image``: expected ids per record (the official loader hard-codes
    1024); None takes the first record's count and requires all records to match.
    Strict by default: a repeated escape, an escape at the end of a record, a record starting inside an escaped
    pair, an offset outside the stream, or a wrong id count raise :class:`TokenFormatError` with the record and byte
    offset. ``lenient=True`` decodes like the official per-record loop (repeated / trailing escapes ignored).
    """
    buf = np.frombuffer(stream, dtype=np.uint8) if not isinstance(stream, np.ndarray) else stream.astype(np.uint8)
    off = np.asarray(offsets)
    if off.ndim != 1 or off.size < 1 or not np.issubdtype(off.dtype, np.integer):
        raise TokenFormatError(f"{source}: the index must be a 1-D integer array of N+1 byte offsets, "
                               f"got shape {off.shape} dtype {off.dtype}")
    off = off.astype(np.int64)
    n = off.size - 1
    if off[0] != 0:
        raise TokenFormatError(f"{source}: record 0 must start at byte offset 0, index says {off[0]}")
    steps = np.diff(off)
    if (steps < 0).any():
        r = int(np.argmax(steps < 0))
        raise TokenFormatError(f"{source}: index is not non-decreasing: record {r} spans byte offsets "
                               f"{off[r]}..{off[r + 1]}")
    if off[-1] != buf.size:
        r = _record_of(off, min(buf.size, int(off[-1])))
        raise TokenFormatError(
            f"{source}: index ends at byte offset {off[-1]} but the stream has {buf.size} bytes "
            f"(record {min(max(r, 0), max(n - 1, 0))}; truncated data file or an index of another file)")
    esc = buf == ESCAPE
    starts = off[:-1]
    if not lenient and buf.size:
        # a record must not start on the value byte of an escaped pair, i.e. the byte before a start is no escape
        inner = starts[(starts > 0) & (starts < buf.size)]
        dangling = inner[esc[inner - 1]]
        if esc[-1]:
            dangling = np.append(dangling, buf.size)
        if dangling.size:
            b = int(dangling[0]) - 1
            raise TokenFormatError(f"{source}: record {_record_of(off, b)} ends with a dangling escape byte "
                                   f"{ESCAPE} at byte offset {b} (truncated or corrupt record)")
        dbl = np.flatnonzero(esc[:-1] & esc[1:])
        if dbl.size:
            b = int(dbl[0])
            raise TokenFormatError(f"{source}: record {_record_of(off, b)} has two escape bytes in a row at byte "
                                   f"offsets {b}-{b + 1} (corrupt; lenient=True reads it like the official loader)")
    # escape flag of the previous byte, never carried across a record boundary (the official loop is per record)
    prev = np.zeros_like(esc)
    prev[1:] = esc[:-1]
    prev[starts[starts < buf.size]] = False
    keep = ~esc
    values = buf[keep].astype(np.uint16) + np.where(prev[keep], ESCAPE, 0).astype(np.uint16)
    counts = np.diff(np.concatenate([[0], np.cumsum(keep)])[off])
    if n == 0:
        return np.zeros((0, tokens_per_image or 0), dtype=np.uint16)
    expected = int(counts[0]) if tokens_per_image is None else int(tokens_per_image)
    bad = np.flatnonzero(counts != expected)
    if bad.size:
        r = int(bad[0])
        raise TokenFormatError(f"{source}: record {r} (byte offsets {off[r]}..{off[r + 1]}) decodes to "
                               f"{counts[r]} ids, expected {expected}")
    return values.reshape(n, expected)


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------
def _gunzip(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return gzip.decompress(f.read())
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        raise TokenFormatError(f"{path}: corrupt or truncated gzip stream ({e}); re-write or re-download the "
                               "file") from e


def _grid_of(tokens: int, grid: Optional[tuple[int, int]]) -> tuple[int, int]:
    if grid is not None:
        if grid[0] * grid[1] != tokens:
            raise TokenFormatError(f"grid {grid} holds {grid[0] * grid[1]} ids but records have {tokens}")
        return tuple(grid)
    side = int(math.isqrt(tokens))
    if side * side != tokens:
        raise TokenFormatError(f"records have {tokens} ids, not a square grid (the official loader reshapes to "
                               "sqrt x sqrt); pass grid=(H, W)")
    return side, side


def write_token_file(
    paths: Union[TokenFilePaths, PathLike],
    ids: Union[np.ndarray, torch.Tensor],
    labels: Optional[Union[np.ndarray, torch.Tensor, Sequence[int]]] = None,
    compresslevel: int = 9,
) -> TokenFilePaths:
    """Write ids (N, H, W) and labels in SeiT's format; ``paths`` may be a data-file path (``*data.bin.gz``)."""
    if not isinstance(paths, TokenFilePaths):
        data = Path(paths)
        labels_path = data.with_name(data.name.replace("-token.data.bin.gz", "-label.txt").replace(".data.bin.gz",
                                                                                                      ".label.txt"))
        paths = TokenFilePaths(data=data, index=_index_path_for(data), labels=labels_path)
    stream, offsets = encode_ids(ids)
    n = offsets.size - 1
    paths.data.parent.mkdir(parents=True, exist_ok=True)
    with open(paths.data, "wb") as f:
        f.write(gzip.compress(stream, compresslevel=compresslevel, mtime=0))
    bio = io.BytesIO()
    np.save(bio, offsets)
    with open(paths.index, "wb") as f:
        f.write(gzip.compress(bio.getvalue(), compresslevel=compresslevel, mtime=0))
    if labels is not None:
        lab = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels).reshape(-1)
        if lab.size != n:
            raise ValueError(f"{lab.size} labels for {n} token records")
        paths.labels.write_text("".join(f"{int(v)}\n" for v in lab))
    return paths


def _read_labels(path: Path, n: int) -> np.ndarray:
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        s = line.strip()
        if not s:
            continue
        try:
            out.append(int(s))
        except ValueError:
            raise TokenFormatError(f"{path}: line {i + 1} is not an integer class id: {s!r}") from None
    if len(out) != n:
        raise TokenFormatError(f"{path}: {len(out)} labels but the token file has {n} records")
    return np.asarray(out, dtype=np.int64)


@dataclass
class TokenSet:
    """Decoded ids ``(N, H, W)`` (uint16, possibly a read-only memmap) and labels ``(N,)`` or None."""

    ids: np.ndarray
    labels: Optional[np.ndarray]
    paths: Optional[TokenFilePaths] = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.ids.shape[1]), int(self.ids.shape[2])


def read_token_file(
    data_path: Union[TokenFilePaths, PathLike],
    index_path: Optional[PathLike] = None,
    labels_path: Optional[PathLike] = None,
    tokens_per_image: Optional[int] = None,
    grid: Optional[tuple[int, int]] = None,
    cache_path: Optional[PathLike] = None,
    lenient: bool = False,
) -> TokenSet:
    """Read a split written by :func:`write_token_file` or the official release.

    ``index_path`` defaults to the official rule (``data.bin`` -> ``index.npy``); ``labels_path`` None reads no
    labels (a :class:`TokenFilePaths` brings its own). ``cache_path``: a ``uint16`` ``.npy`` file that is written
    on the first read and memory-mapped afterwards (rebuilt when the data file changed).
    """
    if isinstance(data_path, TokenFilePaths):
        paths = data_path
        labels_path = paths.labels if (labels_path is None and paths.labels.is_file()) else labels_path
    else:
        dp = Path(data_path)
        paths = TokenFilePaths(dp, Path(index_path) if index_path else _index_path_for(dp),
                               Path(labels_path) if labels_path else Path(os.devnull))
    for p in (paths.data, paths.index):
        if not p.is_file():
            raise FileNotFoundError(f"token file {p} does not exist")
    index_bytes = _gunzip(paths.index)
    try:
        offsets = np.load(io.BytesIO(index_bytes), allow_pickle=False)
    except Exception as e:  # numpy raises several types for a bad header
        raise TokenFormatError(f"{paths.index}: not a valid .npy array ({e})") from e
    n = int(np.asarray(offsets).size) - 1
    ids = None
    stamp = None
    if cache_path is not None:
        cache_path = Path(cache_path)
        st = paths.data.stat()
        stamp = {"data": str(paths.data.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "n": n}
        meta = cache_path.with_name(cache_path.name + ".json")
        if cache_path.is_file() and meta.is_file() and json.loads(meta.read_text()) == stamp:
            ids = np.load(cache_path, mmap_mode="r")
    if ids is None:
        flat = decode_stream(_gunzip(paths.data), offsets, tokens_per_image, lenient, source=str(paths.data))
        h, w = _grid_of(flat.shape[1], grid) if flat.shape[0] else (0, 0)
        ids = flat.reshape(flat.shape[0], h, w)
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            mm = np.lib.format.open_memmap(cache_path, mode="w+", dtype=np.uint16, shape=ids.shape)
            mm[...] = ids
            mm.flush()
            del mm
            cache_path.with_name(cache_path.name + ".json").write_text(json.dumps(stamp))
            ids = np.load(cache_path, mmap_mode="r")
    labels = _read_labels(Path(labels_path), n) if labels_path and str(labels_path) != os.devnull else None
    return TokenSet(ids=ids, labels=labels, paths=paths)


def read_release_split(root: PathLike, split: str = "train", name: str = "imagenet1k", **kwargs) -> TokenSet:
    """Read a split of the official token release (``IMNET1K-tokens.tar`` unpacked in ``root``), 32x32 ids each."""
    kwargs.setdefault("tokens_per_image", 1024)
    return read_token_file(token_file_paths(root, name, split), **kwargs)


class TokenDataset(torch.utils.data.Dataset):
    """Map-style dataset over a :class:`TokenSet`: returns ``(ids LongTensor (H, W), label)``.

    ``transform`` is applied to the id grid (e.g. :class:`tokenbook.methods.token_aug.TokenEDA`), as the official dataset
    does before one-hot; the codebook lookup and the crops run on the batch (:mod:`tokenbook.methods.token_aug`).
    """

    def __init__(self, tokens: TokenSet, transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        if tokens.labels is None:
            raise ValueError("TokenDataset needs labels: read the token file with its labels file")
        self.tokens = tokens
        self.transform = transform

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(np.asarray(self.tokens.ids[i], dtype=np.int64))
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.tokens.labels[i])


# ----------------------------------------------------------------------------------------------------------
# Codebooks
# ----------------------------------------------------------------------------------------------------------
def load_codebook(path: PathLike) -> torch.Tensor:
    """Load a codebook (K, D) float tensor: the release's ``codebook.ckpt`` (a plain tensor, 391 x 32) or a dict
    holding exactly one 2-D tensor (or one under ``codebook`` / ``weight`` / ``embedding.weight``)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        for k in ("codebook", "weight", "embedding.weight", "quantizer.embedding.weight"):
            if k in obj and torch.is_tensor(obj[k]):
                obj = obj[k]
                break
        else:
            tensors = {k: v for k, v in obj.items() if torch.is_tensor(v) and v.ndim == 2}
            if len(tensors) != 1:
                raise ValueError(f"{path}: expected a (K, D) codebook tensor; the dict has keys {sorted(obj)}")
            obj = next(iter(tensors.values()))
    if not torch.is_tensor(obj) or obj.ndim != 2:
        raise ValueError(f"{path}: expected a (K, D) codebook tensor, got {type(obj).__name__} "
                         f"{tuple(obj.shape) if torch.is_tensor(obj) else ''}")
    return obj.detach().float().contiguous()


def save_codebook(codebook: torch.Tensor, path: PathLike) -> Path:
    """Save a (K, D) codebook as a plain tensor, like the release's ``codebook.ckpt``."""
    if codebook.ndim != 2:
        raise ValueError(f"codebook must be (K, D), got {tuple(codebook.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(codebook.detach().cpu().float().clone(), path)
    return path


# ----------------------------------------------------------------------------------------------------------
# VQ tokenizer
# ----------------------------------------------------------------------------------------------------------
class _ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class VQTokenizer(nn.Module):
    """Small convolutional VQ auto-encoder with ViT-VQGAN's cosine codebook lookup.

    Encoder: Conv3x3 -> ``log2(downsample)`` x (Conv4x4 stride 2) -> residual block -> Conv1x1 to ``code_dim``.
    Quantizer: ``ids = argmax_k <z/|z|, e_k/|e_k|>`` (cosine nearest code); the decoder gets the normalised code
    vector with a straight-through gradient. Decoder mirrors the encoder with transposed convs; images are in
    [0, 1]. ``downsample`` 2 gives a 14x14 grid on 28x28 images, 4 gives 7x7.
    """

    def __init__(self, in_chans: int = 1, image_size: int = 28, downsample: int = 2, codebook_size: int = 391,
                 code_dim: int = 32, hidden: int = 64, beta: float = 0.25) -> None:
        super().__init__()
        if downsample < 1 or downsample & (downsample - 1):
            raise ValueError(f"downsample must be a power of two, got {downsample}")
        if image_size % downsample:
            raise ValueError(f"image_size {image_size} is not divisible by downsample {downsample}")
        if not 1 < codebook_size <= MAX_TOKEN_ID + 1:
            raise ValueError(f"codebook_size must be in 2..{MAX_TOKEN_ID + 1} (the token file format's id range)")
        self.config = dict(in_chans=in_chans, image_size=image_size, downsample=downsample,
                           codebook_size=codebook_size, code_dim=code_dim, hidden=hidden, beta=beta)
        self.in_chans, self.image_size, self.downsample = in_chans, image_size, downsample
        self.codebook_size, self.code_dim, self.beta = codebook_size, code_dim, beta
        n_down = int(math.log2(downsample))
        enc: list[nn.Module] = [nn.Conv2d(in_chans, hidden, 3, padding=1)]
        for _ in range(n_down):
            enc += [nn.ReLU(), nn.Conv2d(hidden, hidden, 4, stride=2, padding=1)]
        enc += [_ResBlock(hidden), nn.ReLU(), nn.Conv2d(hidden, code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(code_dim, hidden, 3, padding=1), _ResBlock(hidden)]
        for _ in range(n_down):
            dec += [nn.ReLU(), nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1)]
        dec += [nn.ReLU(), nn.Conv2d(hidden, in_chans, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self.codebook = nn.Parameter(torch.randn(codebook_size, code_dim))

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        if x.shape[-1] % self.downsample or x.shape[-2] % self.downsample:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by downsample {self.downsample}")

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous pre-quantization latents (B, code_dim, h, w)."""
        self._check(x)
        return self.encoder(x)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cosine nearest code: returns (normalised code vectors with straight-through grad, ids, VQ loss)."""
        zn = F.normalize(z.permute(0, 2, 3, 1), dim=-1)                      # (B, h, w, D)
        en = F.normalize(self.codebook, dim=-1)
        ids = torch.argmax(zn @ en.t(), dim=-1)                              # (B, h, w)
        # F.embedding, not en[ids]: the backward of advanced indexing on CPU (index_put_ with accumulate) adds
        # into the codebook gradient with parallel atomic float adds when more than one thread runs, so the sum
        # order (and the last bits) changed from run to run; embedding's backward is deterministic. Same values.
        q = F.embedding(ids, en)
        loss = F.mse_loss(q, zn.detach()) + self.beta * F.mse_loss(zn, q.detach())
        q_st = zn + (q - zn).detach()
        return q_st.permute(0, 3, 1, 2), ids, loss

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> ids (B, H/ds, W/ds) long."""
        return self.quantize(self.encode_latents(x))[1]

    def decode_codes(self, q: torch.Tensor) -> torch.Tensor:
        return self.decoder(q)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (B, h, w) -> images (B, C, h*ds, w*ds) clamped to [0, 1]."""
        ids = ids.long()
        if ids.min() < 0 or ids.max() >= self.codebook_size:
            raise ValueError(f"ids must be in 0..{self.codebook_size - 1}, got {int(ids.min())}..{int(ids.max())}")
        q = F.normalize(self.codebook, dim=-1)[ids].permute(0, 3, 1, 2)
        return self.decoder(q).clamp(0, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (reconstruction, VQ loss, ids)."""
        q, ids, vq_loss = self.quantize(self.encode_latents(x))
        return self.decoder(q), vq_loss, ids

    def export_codebook(self, normalize: bool = False) -> torch.Tensor:
        """The codebook as the classifier sees it: raw rows like SeiT (``normalize=True`` gives unit rows)."""
        cb = self.codebook.detach().float().cpu().clone()
        return F.normalize(cb, dim=-1) if normalize else cb


def _images_of(batch: Any) -> torch.Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(x, dict):
        x = x.get("image", x.get("pixel_values"))
    if not torch.is_tensor(x):
        raise ValueError(f"expected batches of image tensors (or (images, labels)), got {type(x).__name__}")
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def train_tokenizer(
    model: VQTokenizer,
    data: Iterable,
    steps: int = 1000,
    lr: float = 2e-3,
    device: Union[str, torch.device] = "cpu",
    restart_dead_codes: bool = True,
    restart_every: int = 100,
    log_every: int = 50,
    callback: Optional[Callable[[dict], None]] = None,
) -> list[dict]:
    """Train the tokenizer with Adam on ``MSE(recon, x) + VQ loss``; returns one row per logged step.

    ``data``: an iterable of image batches (or (images, labels) tuples), float in [0, 1] or uint8, cycled until
    ``steps``. ``restart_dead_codes`` (our addition; SeiT's tokenizer recipe is unknown) re-initialises codes unused
    for ``restart_every`` steps to random encoder outputs of the current batch, which keeps a few-hundred-code
    codebook in use on a short CPU run. Rows: step, loss, recon_mse, vq_loss, codes_used (in the last window).
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    device = torch.device(device)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    usage = torch.zeros(model.codebook_size, dtype=torch.long, device=device)
    hist: list[dict] = []
    it = iter(data)
    step = 0
    while step < steps:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(data)
            batch = next(it)
        x = _images_of(batch).to(device)
        recon, vq_loss, ids = model(x)
        rec = F.mse_loss(recon, x)
        loss = rec + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        usage += torch.bincount(ids.reshape(-1), minlength=model.codebook_size)
        if restart_dead_codes and step % restart_every == 0:
            dead = torch.nonzero(usage == 0).reshape(-1)
            if dead.numel():
                with torch.no_grad():
                    z = model.encode_latents(x).permute(0, 2, 3, 1).reshape(-1, model.code_dim)
                    pick = torch.randint(0, z.shape[0], (dead.numel(),), device=device)
                    model.codebook[dead] = z[pick] + 0.01 * torch.randn_like(z[pick])
            usage.zero_()
        if step % log_every == 0 or step == 1 or step == steps:
            row = {"step": step, "loss": loss.item(), "recon_mse": rec.item(), "vq_loss": vq_loss.item(),
                   "codes_used": int((usage > 0).sum()) if usage.any() else int(ids.unique().numel())}
            hist.append(row)
            if callback:
                callback(row)
    model.eval()
    return hist


def save_tokenizer(model: VQTokenizer, path: PathLike) -> Path:
    """Save config + weights (a plain dict, loadable with ``weights_only=True``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"config": dict(model.config), "state_dict": sd}, path)
    return path


def load_tokenizer(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> VQTokenizer:
    """Load a tokenizer saved by :func:`save_tokenizer`; mismatching weights name the missing/unexpected keys."""
    obj = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(obj, dict) or "config" not in obj or "state_dict" not in obj:
        raise ValueError(f"{path}: not a tokenizer file written by save_tokenizer (needs 'config' and 'state_dict')")
    model = VQTokenizer(**obj["config"])
    own, sd = model.state_dict(), obj["state_dict"]
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd if k in own
                    and sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"{path}: weights do not match the config; missing keys {missing}, unexpected keys "
                         f"{unexpected}, shape mismatches {shapes}")
    model.load_state_dict(sd)
    return model.eval()


def _as_image_tensor(img: Any, in_chans: int) -> torch.Tensor:
    if not torch.is_tensor(img):
        arr = np.asarray(img)
        t = torch.from_numpy(arr.copy())
        if t.ndim == 3 and t.shape[-1] in (1, 3) and t.shape[0] not in (1, 3):
            t = t.permute(2, 0, 1)
        img = t
    x = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
    if x.ndim == 2:
        x = x[None]
    if x.shape[0] != in_chans:
        if x.shape[0] == 1 and in_chans == 3:
            x = x.expand(3, -1, -1)
        elif x.shape[0] == 3 and in_chans == 1:
            x = x.mean(0, keepdim=True)
        else:
            raise ValueError(f"image has {x.shape[0]} channels, tokenizer expects {in_chans}")
    return x


@torch.no_grad()
def tokenize_images(tokenizer: VQTokenizer, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Images (N, C, H, W) (float in [0, 1] or uint8) -> ids (N, h, w) long, in batches."""
    tokenizer.eval()
    dev = tokenizer.codebook.device
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size]
        x = (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()).to(dev)
        out.append(tokenizer.encode(x).cpu())
    return torch.cat(out) if out else torch.zeros(0, tokenizer.grid_size, tokenizer.grid_size, dtype=torch.long)


@torch.no_grad()
def tokenize_dataset(
    tokenizer: VQTokenizer,
    dataset: Any,
    paths: Union[TokenFilePaths, PathLike],
    batch_size: int = 512,
    image_fn: Optional[Callable[[Any], torch.Tensor]] = None,
) -> TokenFilePaths:
    """Tokenize a dataset of ``(image, label)`` items and write it in SeiT's format.

    Images may be PIL images, uint8 arrays/tensors (H, W[, C]) or float tensors (C, H, W) in [0, 1]; grey images
    are replicated for a 3-channel tokenizer. ``image_fn`` overrides the conversion (e.g. to undo a normalisation).
    """
    conv = image_fn or (lambda im: _as_image_tensor(im, tokenizer.in_chans))
    all_ids, all_labels, xs, ys = [], [], [], []

    def flush() -> None:
        if xs:
            all_ids.append(tokenize_images(tokenizer, torch.stack(xs), batch_size))
            all_labels.extend(ys)
            xs.clear()
            ys.clear()

    for i in range(len(dataset)):
        img, label = dataset[i][:2]
        xs.append(conv(img))
        ys.append(int(label))
        if len(xs) == batch_size:
            flush()
    flush()
    ids = torch.cat(all_ids) if all_ids else torch.zeros(0, tokenizer.grid_size, tokenizer.grid_size, dtype=torch.long)
    return write_token_file(paths, ids.numpy().astype(np.uint16), all_labels)


@torch.no_grad()
def decode_tokens(tokenizer: VQTokenizer, ids: Union[np.ndarray, torch.Tensor], batch_size: int = 512) -> torch.Tensor:
    """Ids (N, h, w) -> images (N, C, H, W) in [0, 1] (CPU)."""
    t = torch.as_tensor(np.asarray(ids, dtype=np.int64)) if not torch.is_tensor(ids) else ids.long()
    dev = tokenizer.codebook.device
    tokenizer.eval()
    out = [tokenizer.decode(t[i:i + batch_size].to(dev)).cpu() for i in range(0, t.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, tokenizer.in_chans, tokenizer.image_size, tokenizer.image_size)


@torch.no_grad()
def reconstruction_error(tokenizer: VQTokenizer, images: torch.Tensor, batch_size: int = 512) -> dict[str, float]:
    """Mean squared error and PSNR (dB, peak 1) of encode -> decode on images in [0, 1]; plus codes used."""
    ids = tokenize_images(tokenizer, images, batch_size)
    rec = decode_tokens(tokenizer, ids, batch_size)
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mse = float(F.mse_loss(rec, x.cpu()))
    return {"mse": mse, "psnr_db": float(10 * math.log10(1.0 / max(mse, 1e-12))),
            "codes_used": int(ids.unique().numel()), "codebook_size": tokenizer.codebook_size}


# ----------------------------------------------------------------------------------------------------------
# Storage accounting
# ----------------------------------------------------------------------------------------------------------
def to_uint8_images(images: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    """(N, H, W), (N, H, W, C) uint8 or (N, C, H, W) float in [0, 1] -> uint8 (N, H, W[, C]) for PIL."""
    if torch.is_tensor(images):
        t = images.detach().cpu()
        if t.dtype != torch.uint8:
            t = (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
        if t.ndim == 4 and t.shape[1] in (1, 3):
            t = t.permute(0, 2, 3, 1)
        arr = t.numpy()
    else:
        arr = np.asarray(images)
        if arr.dtype != np.uint8:
            raise ValueError(f"numpy images must be uint8 (N, H, W[, C]), got {arr.dtype}")
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] != 3):
        raise ValueError(f"images must be (N, H, W), (N, H, W, 3) or (N, C, H, W), got {arr.shape}")
    return arr


def storage_report(
    images: Union[np.ndarray, torch.Tensor],
    ids: Optional[Union[np.ndarray, torch.Tensor]] = None,
    jpeg_qualities: Sequence[int] = (95, 75, 50, 25, 5),
    token_paths: Optional[TokenFilePaths] = None,
    codebook_size: Optional[int] = None,
) -> list[dict]:
    """Bytes per image of the same images stored as raw pixels, PNG, JPEG at ``jpeg_qualities`` (PIL), and tokens.

    Token rows (when ``ids`` (N, h, w) are given): the escape-coded stream before gzip, the gzip'd stream (SeiT's
    data file; one stream for the whole split), and that plus the gzip'd index. With ``token_paths`` the real file
    sizes on disk (data + index + labels) are added. With ``codebook_size`` the row ``tokens (entropy bound,
    uniform)`` = h*w*log2(K)/8 bytes. Every row: format, bytes_per_image, total_bytes, n_images, pct_of_raw,
    pct_of_png. Image codecs encode each image separately (as ImageNet's JPEG files are stored).
    """
    from PIL import Image

    arr = to_uint8_images(images)
    n = int(arr.shape[0])
    if n == 0:
        raise ValueError("storage_report needs at least one image")
    rows: list[dict] = []

    def add(fmt: str, total: float, **extra: Any) -> None:
        rows.append({"format": fmt, "bytes_per_image": total / n, "total_bytes": float(total), "n_images": n, **extra})

    add("raw pixels (uint8)", float(arr.size))
    png = 0
    jpg = {q: 0 for q in jpeg_qualities}
    for im in arr:
        pim = Image.fromarray(im)
        b = io.BytesIO()
        pim.save(b, format="PNG", optimize=True)
        png += b.tell()
        for q in jpeg_qualities:
            b = io.BytesIO()
            pim.save(b, format="JPEG", quality=int(q))
            jpg[q] += b.tell()
    add("PNG", float(png))
    for q in jpeg_qualities:
        add(f"JPEG q{q}", float(jpg[q]), quality=int(q))
    if ids is not None:
        tid = ids.detach().cpu().numpy() if torch.is_tensor(ids) else np.asarray(ids)
        if tid.shape[0] != n:
            raise ValueError(f"{tid.shape[0]} token records for {n} images")
        stream, offsets = encode_ids(tid)
        add("tokens (escape-coded, no gzip)", float(len(stream)))
        gz = len(gzip.compress(stream, compresslevel=9, mtime=0))
        add("tokens (gzip stream)", float(gz))
        bio = io.BytesIO()
        np.save(bio, offsets)
        add("tokens (gzip stream + gzip index)", float(gz + len(gzip.compress(bio.getvalue(), 9, mtime=0))))
        if codebook_size:
            per = tid[0].size * math.log2(codebook_size) / 8
            add("tokens (entropy bound, uniform)", per * n)
    if token_paths is not None:
        add("tokens (files on disk)", float(sum(token_paths.sizes().values())))
    raw = rows[0]["total_bytes"]
    png_total = float(png)
    for r in rows:
        r["pct_of_raw"] = 100.0 * r["total_bytes"] / raw
        r["pct_of_png"] = 100.0 * r["total_bytes"] / png_total
    return rows
