"""Latent files: the shard format of `rpiae extract`, exact statistics, streaming readers.

Shards (`shard-00000.safetensors`, ...) hold the keys that latent-caching diffusion trainers
read: `latents` (n, C, H, W), `labels` (n,) int64 (-1 where unknown), `index` (n,) int64
(row -> sample number), and `latents_flip` with `--flip`.

Statistics are exact: each shard's per-element count, mean and sum of squared deviations are
computed in float64 (two passes over the shard), and shards are merged in shard order with
Chan et al.'s pairwise update, so the result does not depend on how the work was split.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from rpiae.fileio import atomic_file
from rpiae.precisions import TORCH_DTYPES

DTYPES = TORCH_DTYPES  # how latents may be stored: the float precisions
# in an extract folder: only shard files match `*.safetensors` at the top level, which is what
# latent-caching DiT trainers glob; the exact statistics live in a subfolder
STATS_FILE = "stats/latents_stats.safetensors"
OLD_STATS_FILE = "latents_stats.safetensors"  # where folders written before kept them (still read)
AUTHORS_STATS_FILE = "normalization_stats.pt"
TRAINER_STATS_FILE = "latents_stats.pt"  # per-channel {"mean", "std"} (1, C, 1, 1), as LightningDiT-style trainers load it


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


# -- statistics -------------------------------------------------------------------------------


@dataclass
class Moments:
    """count, per-element mean and sum of squared deviations (M2), float64."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray, chunk: int = 256) -> "Moments":
        """The moments of the rows of `x`, in float64, `chunk` rows at a time merged in order, so
        that the temporaries stay small (a whole 10000-latent shard in float64 is 1.3 GB)."""
        m = cls.empty(x.shape[1:])
        for i in range(0, len(x), chunk):
            xi = np.array(x[i : i + chunk], np.float64)  # a copy: centred in place below
            mean = xi.mean(axis=0)
            xi -= mean
            m = m.merge(cls(len(xi), mean, np.einsum("i...,i...->...", xi, xi)))
        return m

    @classmethod
    def empty(cls, shape: tuple[int, ...]) -> "Moments":
        return cls(0, np.zeros(shape), np.zeros(shape))

    def merge(self, other: "Moments") -> "Moments":
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return Moments(n, mean, m2)

    @property
    def var(self) -> np.ndarray:
        return self.m2 / max(self.count, 1)

    def channel(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (first axis) mean and population variance, exactly, from the per-element moments."""
        c = self.mean.shape[0]
        per = int(np.prod(self.mean.shape[1:]))
        mean = self.mean.reshape(c, per)
        cmean = mean.mean(axis=1)
        m2 = self.m2.reshape(c, per).sum(axis=1) + self.count * ((mean - cmean[:, None]) ** 2).sum(axis=1)
        return cmean, m2 / max(self.count * per, 1)

    def to_tensors(self) -> dict[str, np.ndarray]:
        return {"count": np.asarray([self.count], np.int64), "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray]) -> "Moments":
        return cls(int(t["count"][0]), t["mean"].astype(np.float64), t["m2"].astype(np.float64))


def _torch_file(obj: dict, path: Path) -> None:
    buf = io.BytesIO()  # not the temporary path: torch.save names the archive after the file
    torch.save(obj, buf)
    with atomic_file(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def write_stats(m: Moments, out_dir: Path) -> list[Path]:
    """The statistics of an extract folder, all from the same exact moments (every latent
    written, flipped ones included; population variance):

    - `stats/latents_stats.safetensors`: float64 per-element `mean`, `var`, per-channel
      `channel_mean`, `channel_var`, and `count` (what `--latent-stats` takes);
    - `normalization_stats.pt`: per-element {"mean", "var"} float32, the format of the RPiAE
      authors' `calculate_stat.py`;
    - `latents_stats.pt`: per-channel {"mean", "std"} float32 of shape (1, C, 1, 1), what
      LightningDiT-style latent datasets load from the folder they read shards from.
    A statistics file an earlier layout kept at the top level is removed (it would be globbed
    as a shard)."""
    cmean, cvar = m.channel()
    stats = {
        "mean": m.mean, "var": m.var, "channel_mean": cmean, "channel_var": cvar,
        "count": np.asarray([m.count], np.int64),
    }
    p1, p2, p3 = out_dir / STATS_FILE, out_dir / AUTHORS_STATS_FILE, out_dir / TRAINER_STATS_FILE
    with atomic_file(p1) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in stats.items()}, str(tmp), metadata={"format": "rpiae-latent-stats"})
    _torch_file({"mean": torch.from_numpy(m.mean).float(), "var": torch.from_numpy(m.var).float()}, p2)
    _torch_file({"mean": torch.from_numpy(cmean).float().reshape(1, -1, 1, 1),
                 "std": torch.from_numpy(np.sqrt(cvar)).float().reshape(1, -1, 1, 1)}, p3)
    (out_dir / OLD_STATS_FILE).unlink(missing_ok=True)
    return [p1, p2, p3]


# -- shards -----------------------------------------------------------------------------------------


def to_storage(latents: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(latents, np.float32)).to(DTYPES[dtype])


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file as save_torch

    with atomic_file(path) as tmp:
        save_torch({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "rpiae-latents"})


# -- reading latents, batch by batch ---------------------------------------------------------------


class LatentFile:
    """A stream of latents from `.npy` (memory-mapped; any float type and byte order; no `key`),
    `.npz` (`arr_0` or `key`, read member by chunks), `.safetensors` (`latents` or `key`,
    sliced lazily) or an `rpiae extract` directory (its shards in order, `latents` or `key`,
    e.g. `latents_flip`; `manifest` holds its manifest). `batches(n)` yields (sample numbers,
    float32 array); nothing holds all latents at once. A damaged file, and a latent holding
    NaN or Inf, are one-line `ValueError`s naming the file (and the sample)."""

    def __init__(self, path: str | Path, key: str | None = None) -> None:
        self.path = Path(path)
        self.key = key
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such latent file or directory")
        self.kind = "dir" if self.path.is_dir() else self.path.suffix.lstrip(".")
        if self.kind not in ("npy", "npz", "safetensors", "dir"):
            raise ValueError(f"{self.path}: latents must be .npy, .npz, .safetensors or an `rpiae extract` directory")
        self.manifest: dict | None = None  # an extract directory's manifest.json
        self.shape, self.parts = self._probe()
        self.dtype = self._dtype()

    def __len__(self) -> int:
        return self.shape[0]

    def _dtype(self) -> str:
        """The stored type: numpy's name for .npy/.npz (byte order left out: a big-endian
        `>f4` is "float32" and is read as native float32), safetensors' for the others."""
        try:
            if self.kind == "npy":
                return self.parts[0].dtype.name
            if self.kind == "npz":
                with zipfile.ZipFile(self.path) as zf, zf.open(self.parts[0]) as f:
                    return _npy_header(f, self.path)[1].name
            path, key = self.parts[0]
            with safe_open(str(path), framework="pt") as f:
                return str(f.get_slice(key).get_dtype()).lower()
        except _READ_ERRORS as e:
            raise _unreadable(self.path, e) from None

    def check(self, shape: tuple[int, ...]) -> None:
        """Refuse latents of another shape or a non-float type before anything is decoded."""
        if len(self.shape) != 4 or tuple(self.shape[1:]) != tuple(shape) or self.shape[0] < 1:
            raise ValueError(f"{self.path}: expected shape (N, {', '.join(map(str, shape))}), got {tuple(self.shape)}")
        if not any(t in self.dtype for t in ("float", "f16", "f32", "f64", "bf16")):
            raise ValueError(f"{self.path}: expected a floating-point array, got dtype {self.dtype}")

    def _probe(self) -> tuple[tuple[int, ...], list]:
        p = self.path
        try:
            if self.kind == "npy":
                if self.key is not None:
                    raise ValueError(f"{p}: a .npy file holds one array; --key {self.key} is for .npz, .safetensors "
                                     f"and `rpiae extract` directories")
                try:
                    arr = np.load(p, mmap_mode="r", allow_pickle=False)
                except EOFError:  # an empty file (click would take an EOFError for Ctrl-D: "Aborted!")
                    raise ValueError(f"{p}: not a readable .npy array (the file is empty or truncated)") from None
                except ValueError as e:  # not an .npy, or an object array
                    raise ValueError(f"{p}: not a readable .npy array ({' '.join(str(e).split())[:80]})") from None
                return arr.shape, [arr]
            if self.kind == "npz":
                key = (self.key or "arr_0") + ".npy"
                with zipfile.ZipFile(p) as zf:
                    if key not in zf.namelist():
                        raise ValueError(f"{p}: no array {key[:-4]!r} (has: {', '.join(n[:-4] for n in zf.namelist())})")
                    with zf.open(key) as f:
                        shape, _, _ = _npy_header(f, p)
                return shape, [key]
            if self.kind == "safetensors":
                key = self.key or "latents"
                with safe_open(str(p), framework="pt") as f:
                    if key not in f.keys():
                        raise ValueError(f"{p}: no tensor {key!r} (has: {', '.join(f.keys())})")
                    return tuple(f.get_slice(key).get_shape()), [(p, key)]
            manifest = p / "manifest.json"
            if not manifest.is_file():
                raise ValueError(f"{p}: not an `rpiae extract` directory (no manifest.json)")
            self.manifest = json.loads(manifest.read_text())
            key = self.key or "latents"
            parts, n, shape = [], 0, None
            for s in self.manifest["shards"]:
                shard = p / s["file"]
                try:
                    with safe_open(str(shard), framework="pt") as f:
                        if key not in f.keys():
                            flip = " (latents_flip is written by `rpiae extract --flip`)" if key == "latents_flip" else ""
                            raise ValueError(f"{shard}: no tensor {key!r} (has: {', '.join(sorted(f.keys()))}){flip}")
                        sh = tuple(f.get_slice(key).get_shape())
                except _READ_ERRORS as e:
                    raise _unreadable(shard, e) from None
                parts.append((shard, key))
                n += sh[0]
                shape = sh[1:]
            if shape is None:
                raise ValueError(f"{p}: the extract directory has no shards")
            return (n, *shape), parts
        except _READ_ERRORS as e:
            raise _unreadable(p, e) from None

    def batches(self, n: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(sample numbers, float32 latents) `n` at a time, in order. A latent holding NaN or Inf
        stops the stream with one line naming the file and the sample; so does a file that
        cannot be read."""
        try:
            for ids, z in self._batches(n):
                finite = np.isfinite(z).reshape(len(z), -1).all(axis=1)
                if not finite.all():
                    raise ValueError(f"{self.path}: the latent of sample {int(ids[int(np.argmin(finite))])} contains NaN "
                                     f"or Inf values")
                yield ids, z
        except _READ_ERRORS as e:
            raise _unreadable(self.path, e) from None

    def _batches(self, n: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self.kind == "npy":
            arr = self.parts[0]
            for i in range(0, len(arr), n):
                yield np.arange(i, min(i + n, len(arr))), np.array(arr[i : i + n], np.float32)  # a copy, not the map
        elif self.kind == "npz":
            with zipfile.ZipFile(self.path) as zf, zf.open(self.parts[0]) as f:
                shape, dtype, fortran = _npy_header(f, self.path)
                if fortran:
                    raise ValueError(f"{self.path}: Fortran-ordered arrays are not supported")
                row = int(np.prod(shape[1:])) * dtype.itemsize
                for i in range(0, shape[0], n):
                    k = min(n, shape[0] - i)
                    buf = f.read(row * k)
                    yield np.arange(i, i + k), np.frombuffer(buf, dtype).reshape(k, *shape[1:]).astype(np.float32)
        else:
            start = 0
            for path, key in self.parts:
                with safe_open(str(path), framework="pt") as f:  # "pt": bf16 shards too
                    sl = f.get_slice(key)
                    rows = sl.get_shape()[0]
                    index = f.get_tensor("index").numpy() if self.kind == "dir" else None
                    for i in range(0, rows, n):
                        z = sl[i : i + n].float().numpy()
                        ids = index[i : i + n] if index is not None else np.arange(start + i, start + i + len(z))
                        yield ids, z
                start += rows


def _npy_header(f, path: Path) -> tuple[tuple[int, ...], np.dtype, bool]:
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except (ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz array ({' '.join(str(e).split())[:80]})") from None
    return tuple(shape), np.dtype(dtype), fortran


# what reading a damaged latent file raises: an empty or truncated file (EOFError), a bad zip,
# a safetensors header that is too small or not JSON (SafetensorError), a manifest that is not JSON
_READ_ERRORS = (OSError, EOFError, zipfile.BadZipFile, json.JSONDecodeError, KeyError, TypeError, SafetensorError)


def _unreadable(path: Path, e: BaseException) -> ValueError:
    text = " ".join(str(e).split())[:200]
    return ValueError(f"{path}: not a readable latent file ({type(e).__name__}: {text})")
