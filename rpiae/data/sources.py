"""Image datasets as an ordered, random-access list of samples, for streaming jobs.

`open_source(data)` recognises:

- a folder of images (searched recursively, sorted): labels -1;
- an ImageFolder tree: a folder whose images sit in sub-folders, one per class; labels are
  class indices by sorted class name, and the sample order is torchvision's `ImageFolder`
  order (classes sorted, then `os.walk` sorted). Images at the root itself belong to no class
  and are left out, as torchvision does, with a warning; a class folder without images is an
  error, as torchvision's "Found no valid file for the classes ..."; `no_labels=True` reads the
  tree as a plain folder, recursively;
- a `.txt` list: `path` or `path label` per line (paths relative to the list's folder;
  blank lines and `#` comments skipped). A line is `path label` when its last field is an
  integer and the whole line is not an existing file; otherwise the whole line is the path (a
  path may contain spaces). A last field that is not an integer after an existing file is an
  error (a mistyped label). The list is UTF-8; bytes that are not (file names in another
  encoding) are kept as the file system's bytes (`os.fsdecode`);
- WebDataset `.tar` shards: a path, glob or brace pattern (`data/train-{000..099}.tar`).
  Samples follow WebDataset's conventions (`webdataset.tariterators`: the key is the file
  name up to the first dot of its base name, consecutive files with one key form a sample,
  `__*__` entries skipped); the image is the sample's image-typed member, the label its
  `cls` member when present. The tars are indexed once by their headers and read by
  offset, so any sample can be read without streaming through the tar.

Folders are walked as torchvision's ImageFolder walks them (`os.walk(followlinks=True)`), in
both folder kinds: symlinked folders are entered, a symlink loop is not followed twice
(`rpiae.imageio.walk_folder`).

Every sample has a stable string `ref` (relative path, or `shard.tar:key`) that the job
manifests record, and `source.open(i)` returns it as a PIL image.

Bad samples are one policy for every kind: a listed file that does not exist, a file that
cannot be decoded and a WebDataset sample without an image all stay in the sample list and
fail when read (`ImageError`, naming the sample), so a job stops at the first or, with
`--skip-bad`, skips and lists them. A sub-folder that cannot be listed (no permission) is one
such sample (ref `its/path/`) that fails naming the folder. Only a source that cannot be listed at all (no such
folder, an unreadable tar, a malformed list line) is a `SourceError`.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import re
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from rpiae.imageio import IMAGE_SUFFIXES, ImageError, crop_image, walk_folder

KINDS = ("folder", "imagefolder", "list", "webdataset", "files")
_TAR_IMAGE_EXT = tuple(s.lstrip(".") for s in IMAGE_SUFFIXES)


class SourceError(ValueError):
    """A dataset that cannot be read (one line, names what is wrong)."""


@dataclass
class Source:
    kind: str
    root: str
    refs: list[str]  # one per sample, in order
    labels: np.ndarray  # (N,) int64, -1 where the source has none
    classes: list[str] | None = None
    # webdataset: ref -> (tar path, offset, size) of the image and of the cls member
    _tar_index: dict[str, tuple[str, int, int, int, int]] = field(default_factory=dict, repr=False)
    # folders: ref of a sub-folder that could not be listed -> why (the sample fails when read)
    _unlisted: dict[str, str] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.refs)

    def path(self, i: int) -> Path:
        return Path(self.root, self.refs[i])

    def read_bytes(self, i: int) -> bytes:
        why = self._unlisted.get(self.refs[i]) if self._unlisted else None
        if why is not None:
            raise ImageError(f"{self.refs[i]}: cannot list folder ({why}); its images are not in the dataset")
        if self.kind != "webdataset":
            path = self.path(i)
            if not path.is_file():
                raise ImageError(f"{self.refs[i]}: no such image file")
            return path.read_bytes()
        tar, offset, size, _, _ = self._tar_index[self.refs[i]]
        if offset < 0:
            raise ImageError(f"{self.refs[i]}: the sample has no image member")
        with open(tar, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def open(self, i: int) -> Image.Image:
        """Sample i as a loaded PIL image; errors name the sample."""
        try:
            img = Image.open(io.BytesIO(self.read_bytes(i)))
            img.load()
            return img
        except ImageError:
            raise
        except Image.UnidentifiedImageError:  # its message names an in-memory object by address
            raise ImageError(f"{self.refs[i]}: cannot read image (not a format Pillow can identify)") from None
        except Exception as e:
            raise ImageError(f"{self.refs[i]}: cannot read image ({type(e).__name__}: {e})") from None

    def describe(self) -> dict:
        return {"kind": self.kind, "root": self.root, "samples": len(self.refs), "classes": self.classes}

    def fingerprint(self, start: int = 0, stop: int | None = None) -> str:
        """sha256 of the refs and labels of samples [start, stop): what a shard was made of."""
        h = hashlib.sha256()
        for ref, label in zip(self.refs[start:stop], self.labels[start:stop].tolist()):
            # a file name that is not UTF-8 holds surrogates (os.fsdecode): hashed as its bytes
            h.update(f"{ref}\t{label}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _walk(top: Path, root: Path, unlisted: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(dirpath, file names) of every folder under `top` (`walk_folder`); a folder that cannot be
    listed becomes (dirpath, None) and its ref (relative to `root`, with a trailing /) is noted."""
    out: list[tuple[str, list[str] | None]] = []

    def unreadable(path: str, e: OSError) -> None:
        rel = Path(path).relative_to(root).as_posix()
        unlisted[rel + "/"] = e.strerror or type(e).__name__
        out.append((path, None))

    for dirpath, _, fnames in walk_folder(top, on_error=unreadable, outer=() if top == root else (root,)):
        out.append((dirpath, fnames))
    return out


def _folder(root: Path) -> Source:
    unlisted: dict[str, str] = {}
    refs = []
    for dirpath, fnames in _walk(root, root, unlisted):
        if fnames is None:
            refs.append(Path(dirpath).relative_to(root).as_posix() + "/")
            continue
        for f in fnames:
            if _is_image(f) and os.path.isfile(os.path.join(dirpath, f)):
                refs.append((Path(dirpath) / f).relative_to(root).as_posix())
    refs.sort(key=lambda r: r.split("/"))  # the order of sorted paths (component by component)
    return Source("folder", str(root), refs, np.full(len(refs), -1, np.int64), _unlisted=unlisted)


def _imagefolder(root: Path) -> Source:
    stray = sorted(e.name for e in os.scandir(root) if e.is_file() and _is_image(e.name))
    if stray:
        warnings.warn(f"{root}: {len(stray)} image(s) at the root of the ImageFolder tree (e.g. {stray[0]}) belong to "
                      f"no class folder and are left out (pass --no-labels to read every image, unlabelled)",
                      stacklevel=3)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    refs, labels, unlisted, empty = [], [], {}, []
    for label, cls in enumerate(classes):
        n = len(refs)
        for dirpath, fnames in sorted(_walk(root / cls, root, unlisted), key=lambda t: t[0]):
            if fnames is None:
                refs.append(Path(dirpath).relative_to(root).as_posix() + "/")
                labels.append(label)
                continue
            for fname in sorted(fnames):
                if _is_image(fname):
                    refs.append((Path(dirpath) / fname).relative_to(root).as_posix())
                    labels.append(label)
        if len(refs) == n:
            empty.append(cls)
    if empty:  # torchvision's ImageFolder: "Found no valid file for the classes ..."
        raise SourceError(f"{root}: found no valid file for the classes {', '.join(empty)} (supported extensions: "
                          f"{', '.join(IMAGE_SUFFIXES)}); remove the empty class folders, or pass --no-labels")
    return Source("imagefolder", str(root), refs, np.asarray(labels, np.int64), classes, _unlisted=unlisted)


def _read_list(path: Path) -> str:
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data:
        raise SourceError(f"{path}: not a text list (UTF-16 or binary); expected UTF-8 text, `path` or `path label` "
                          f"per line")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte-order mark
    return data.decode("utf-8", "surrogateescape")  # other bytes: file names as the file system has them


def _has_image(folder: str) -> bool:
    """Whether a folder holds an image somewhere below it (as the walk of the sources sees it;
    folders that cannot be listed are passed over here)."""
    return any(_is_image(f) for _, _, fs in walk_folder(folder, on_error=lambda *_: None) for f in fs)


def _list(path: Path) -> Source:
    refs, labels = [], []

    def where(text: str) -> Path:
        p = Path(text)
        return p if p.is_absolute() else path.parent / p

    for n, line in enumerate(_read_list(path).splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        label = -1
        if len(parts) == 2 and not where(line).is_file():
            if re.fullmatch(r"-?[0-9]+", parts[1]):  # `path label`
                line, label = parts[0], int(parts[1])
            elif where(parts[0]).is_file():  # an existing file and a mistyped label
                raise SourceError(f"{path}:{n}: label {parts[1]!r} is not an integer (expected `path` or `path label`)")
            # else: the whole line is a path (with spaces) that does not exist: it fails when read
        # a missing file stays in the list and fails when read: stop, or skip with --skip-bad
        refs.append(os.path.relpath(where(line), path.parent))
        labels.append(label)
    return Source("list", str(path.parent), refs, np.asarray(labels, np.int64))


def expand_tar_pattern(pattern: str) -> list[str]:
    """Brace expansion (as WebDataset does), then globbing; in order, duplicates removed."""
    from braceexpand import braceexpand

    out: list[str] = []
    for item in braceexpand(pattern):
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        out.extend(m for m in matches if m not in out)
    return out


def _webdataset(pattern: str) -> Source:
    try:
        from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix
    except ImportError:
        raise SourceError("reading WebDataset shards needs webdataset: pip install webdataset") from None
    import re

    tars = expand_tar_pattern(pattern)
    if not tars:
        raise SourceError(f"{pattern}: matches no .tar files")
    root = os.path.commonpath([os.path.dirname(os.path.abspath(t)) for t in tars])
    refs, labels, index = [], [], {}
    for tar in tars:
        if not os.path.isfile(tar):
            raise SourceError(f"{tar}: no such tar file")
        rel = os.path.relpath(os.path.abspath(tar), root)
        samples: list[tuple[str, dict]] = []  # consecutive members with one key form a sample
        try:
            with tarfile.open(tar, mode="r:") as tf:
                for info in tf:
                    name = info.name
                    if not info.isreg() or ("/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix)):
                        continue
                    if re.match(r"__[^/]*__($|/)", name):
                        continue
                    key, ext = base_plus_ext(name)
                    if key is None:
                        continue
                    if not samples or samples[-1][0] != key:
                        samples.append((key, {}))
                    samples[-1][1][ext.lower()] = (info.offset_data, info.size)
                for key, members in samples:
                    image = next((ext for ext in members if ext in _TAR_IMAGE_EXT), None)
                    ref = f"{rel}:{key}"
                    # a sample without an image stays a sample: it fails when read (stop, or --skip-bad)
                    off, size = members[image] if image is not None else (-1, 0)
                    coff, csize = members.get("cls", (-1, 0))
                    label = -1
                    if coff >= 0:
                        tf.fileobj.seek(coff)
                        text = tf.fileobj.read(csize).decode("utf-8", "replace").strip()
                        try:
                            label = int(text)
                        except ValueError:
                            raise SourceError(f"{ref}: cls is not an integer ({text[:20]!r})") from None
                    refs.append(ref)
                    labels.append(label)
                    index[ref] = (os.path.abspath(tar), off, size, coff, csize)
        except (tarfile.TarError, OSError) as e:
            raise SourceError(f"{tar}: not a readable tar file ({e})") from None
    return Source("webdataset", root, refs, np.asarray(labels, np.int64), None, index)


def files_source(paths: list[str | Path]) -> Source:
    """Image files and folders (expanded recursively, sorted) given on a command line, in order."""
    from rpiae.imageio import find_images

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = find_images(p)
            if not found:
                raise SourceError(f"{p}: no images found")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise SourceError(f"{p}: no such image file")
    if not files:
        raise SourceError("no input images given")
    return Source("files", "", [str(f) for f in files], np.full(len(files), -1, np.int64))


def open_source(data: str | Path, no_labels: bool = False) -> Source:
    """A dataset path or tar pattern -> `Source` (see the module docstring)."""
    text = str(data)
    if text.endswith(".tar") or (".tar" in text and ("{" in text or glob.has_magic(text))):
        src = _webdataset(text)
    else:
        p = Path(text)
        if p.is_file() and p.suffix == ".txt":
            src = _list(p)
        elif p.is_dir():
            # an ImageFolder tree: class sub-folders that hold images (stray images at the root are left out)
            classes = any(e.is_dir() and _has_image(e.path) for e in os.scandir(p))
            src = _imagefolder(p) if (classes and not no_labels) else _folder(p)
        elif p.exists():
            raise SourceError(f"{p}: expected a folder of images, a .txt list or .tar shards")
        else:
            raise SourceError(f"{p}: no such folder, list or tar file")
    if not len(src):
        raise SourceError(f"{data}: no images found")
    if no_labels:
        src.labels = np.full(len(src), -1, np.int64)
        src.classes = None
    return src


class CropDataset:
    """`torch.utils.data.Dataset` view of a source for DataLoader workers: item i is
    (i, float32 (3, size, size) image, error message or ""), so one bad file does not kill a
    worker and the consumer decides whether to stop or skip."""

    def __init__(self, source: Source, crop: str, size: int = 256) -> None:
        self.source, self.crop, self.size = source, crop, size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        import torch

        try:
            x = crop_image(self.source.open(i), self.size, self.crop, self.source.refs[i])
            return i, torch.from_numpy(x), ""
        except Exception as e:
            msg = str(e) if isinstance(e, ImageError) else f"{self.source.refs[i]}: cannot read image ({type(e).__name__}: {e})"
            return i, torch.zeros(3, self.size, self.size), " ".join(msg.split())


def image_loader(source: Source, batches: list[list[int]], crop: str, size: int = 256, workers: int = 0):
    """A DataLoader over `batches` (lists of sample numbers) that yields (ids, images (B, 3,
    size, size) float32, errors) with reading, decoding and cropping in `workers` processes."""
    import torch

    loader = torch.utils.data.DataLoader(
        CropDataset(source, crop, size),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=4 if workers else None,
        worker_init_fn=_init_worker if workers else None,
    )
    return without_sigchld_handler(loader)


def without_sigchld_handler(loader):
    """`loader` as it is without worker processes, else wrapped so that iterating it never
    installs torch's SIGCHLD handler (`_WithoutSIGCHLDHandler`); for every DataLoader of rpiae."""
    return _WithoutSIGCHLDHandler(loader) if loader.num_workers else loader


class _WithoutSIGCHLDHandler:
    """A worker DataLoader that never installs torch's SIGCHLD handler.

    The first DataLoader with workers installs a process-wide SIGCHLD handler (a Python
    handler that checks its workers' pids on every child exit). Measured with it in place: a
    child exiting while the main thread waited in `waitpid` killed the process with SIGSEGV
    (`si_code` SI_KERNEL, no faulting thread): when the loader joined its own workers at the
    end of a run (the test suite, in some orders of its files, on an AVX-512 EPYC), and when a
    process that had run an in-process `rpiae encode` stopped a `tritonserver` child. So the
    handler is kept out while rpiae's loader runs, and torch still finds a dead worker by its
    periodic liveness check (every 5 s while waiting for a batch: "DataLoader worker (pid(s)
    ...) exited unexpectedly"). Once the loader is done (or abandoned) its workers are shut
    down."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        import threading

        from torch.utils.data._utils import signal_handling

        main = threading.current_thread() is threading.main_thread()
        was_set = signal_handling._SIGCHLD_handler_set
        if main:
            signal_handling._SIGCHLD_handler_set = True  # torch's "already installed": it installs none
        try:
            it = iter(self.loader)
            try:
                yield from it
            finally:
                shutdown = getattr(it, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()
                del it
        finally:
            if main:
                signal_handling._SIGCHLD_handler_set = was_set


def _init_worker(_worker_id: int) -> None:
    from rpiae.data.heap import mmap_large_blocks

    mmap_large_blocks()  # decoded photos and crops are freed at once, not left in the heap


def _collate(items):
    import torch

    return [i for i, _, _ in items], torch.stack([x for _, x, _ in items]), [e for _, _, e in items]
