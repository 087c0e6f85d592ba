"""One CUDA major per environment: which CUDA major each GPU package here is built for, and the
check of the repository's constraints files (`constraints/gpu-cu13.txt`, `gpu-cu12.txt`)
against the pinned packages' published metadata.

Where a CUDA major comes from, in order of proof:

- a shared library's ELF `DT_NEEDED` entries (`libcudart.so.13`, `libnvinfer.so.10`): what the
  dynamic loader will look for, read from the installed file (or a wheel's) without loading it;
- a distribution's name (`nvidia-cudnn-cu12`, `tensorrt-cu13-libs`) or, for the packages whose
  version *is* the CUDA version (`cuda-toolkit`, `cuda-bindings`, `nvidia-cuda-runtime`, ...),
  its version; torch's local version label (`2.13.0+cu126`) or `torch.version.cuda`.

Nothing here imports torch, onnxruntime or TensorRT: a broken GPU install can still be
described.
"""

from __future__ import annotations

import io
import json
import re
import struct
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import Version

# the repository's constraints files, one per CUDA major, and how each stack is installed
REPO = Path(__file__).resolve().parents[1]
STACKS: dict[int, dict[str, str]] = {
    13: {"file": "constraints/gpu-cu13.txt", "extra": "gpu-cu13", "driver": "580",
         "index": "",
         "install": 'pip install -c constraints/gpu-cu13.txt -e ".[test,gpu-cu13]"'},
    12: {"file": "constraints/gpu-cu12.txt", "extra": "gpu-cu12", "driver": "525",
         "index": "https://download.pytorch.org/whl/cu126",
         "install": 'pip install -c constraints/gpu-cu12.txt --extra-index-url https://download.pytorch.org/whl/cu126 '
                    '-e ".[test,gpu-cu12]"'},
}

# distributions whose version is the CUDA toolkit version they belong to
VERSIONED_AS_CUDA = {"cuda-toolkit", "cuda-bindings", "cuda-python", "nvidia-cuda-runtime", "nvidia-cuda-nvrtc",
                     "nvidia-cuda-cupti", "nvidia-cuda-nvcc", "nvidia-cublas", "nvidia-nvjitlink", "nvidia-nvtx",
                     "nvidia-cuda-crt", "nvidia-cuda-cccl"}
# nvidia-* distributions that carry no CUDA library
NOT_CUDA = {"nvidia-modelopt", "nvidia-modelopt-core", "nvidia-pytriton", "nvidia-ml-py", "nvidia-pyindex"}


def cuda_bearing(name: str) -> bool:
    """Whether a distribution brings (or is built against) CUDA libraries."""
    n = canonicalize_name(name)
    if n in NOT_CUDA:
        return False
    return (n.startswith(("nvidia-", "cuda-", "tensorrt", "cupy-cuda")) or n in {"onnxruntime-gpu", "torch",
                                                                               "torch-tensorrt"})


def major_from_name(name: str, version: str | None = None) -> int | None:
    """The CUDA major a distribution (name, version) is built for, where the name or the
    version says it: `-cu12`/`-cu13` suffixes, `+cu126` local labels, CUDA-versioned packages."""
    n = canonicalize_name(name)
    if m := re.search(r"-cu(\d\d)(?:-|$)", n):
        return int(m.group(1))
    if m := re.search(r"^cupy-cuda(\d\d)", n):
        return int(m.group(1))
    if version:
        if m := re.search(r"\+cu(\d\d)\d", str(version)):
            return int(m.group(1))
        if n in VERSIONED_AS_CUDA:
            return Version(str(version)).major
    return None


def major_from_requirement(req: Requirement) -> int | None:
    """The CUDA major a requirement asks for: by name, or for CUDA-versioned packages by the
    lowest release its specifier admits (`~=13.0`, `>=13.0.3,<14`, `==13.0.3`)."""
    by_name = major_from_name(req.name)
    if by_name is not None or canonicalize_name(req.name) not in VERSIONED_AS_CUDA:
        return by_name
    floors = [Version(s.version.removesuffix(".*")).major for s in req.specifier
              if s.operator in ("==", "~=", ">=", "===")]
    return min(floors) if floors else None


# -- ELF: the libraries a shared object needs ---------------------------------------------------
def elf_needed(source: str | Path | bytes) -> list[str]:
    """The DT_NEEDED entries of a 64-bit little-endian ELF shared object (a path or its bytes),
    read from its dynamic section without loading it. Raises ValueError for anything else."""
    f = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115 - closed below
    try:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            raise ValueError("not a 64-bit little-endian ELF file")
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        loads, dynamic = [], None
        for i in range(phnum):
            p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz, _memsz, _align = struct.unpack_from(
                "<IIQQQQQQ", table, i * phentsize)
            if p_type == 1:  # PT_LOAD
                loads.append((p_vaddr, p_offset, p_filesz))
            elif p_type == 2:  # PT_DYNAMIC
                dynamic = (p_offset, p_filesz)
        if dynamic is None:
            return []
        f.seek(dynamic[0])
        raw = f.read(dynamic[1])
        entries = [struct.unpack_from("<qQ", raw, i) for i in range(0, len(raw) - 15, 16)]
        strtab = next((v for tag, v in entries if tag == 5), None)  # DT_STRTAB (a virtual address)
        strsz = next((v for tag, v in entries if tag == 10), None)  # DT_STRSZ
        if strtab is None or strsz is None:
            return []
        offset = next((off + strtab - vaddr for vaddr, off, size in loads if vaddr <= strtab < vaddr + size), strtab)
        f.seek(offset)
        strings = f.read(strsz)
        out = []
        for tag, value in entries:
            if tag == 0:  # DT_NULL
                break
            if tag == 1:  # DT_NEEDED
                out.append(strings[value:strings.index(b"\0", value)].decode())
        return out
    except struct.error as e:
        raise ValueError(f"truncated ELF file: {e}") from None
    finally:
        f.close()


def needed_major(needed: Iterable[str], library: str) -> int | None:
    """The major of `library` (e.g. "libcudart", "libnvinfer") among DT_NEEDED entries."""
    for n in needed:
        if m := re.fullmatch(rf"{re.escape(library)}\.so\.(\d+)", n):
            return int(m.group(1))
    return None


# -- this environment ------------------------------------------------------------------------------
def _installed() -> dict[str, str]:
    """{canonical distribution name: version} of everything installed (read once per call site)."""
    return {canonicalize_name(d.metadata["Name"] or ""): d.version for d in metadata.distributions()}


def _named(installed: dict[str, str], prefix: str) -> dict[str, str]:
    """The distributions named `prefix` or `prefix`-something."""
    return {n: v for n, v in installed.items() if n == prefix or n.startswith(prefix + "-")}


def _package_file(dist: str, suffix: str) -> Path | None:
    try:
        files = metadata.distribution(dist).files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(suffix):
            path = Path(f.locate())
            return path if path.is_file() else None
    return None


def environment_majors(torch_cuda: str | None = None) -> dict[str, Any]:
    """What each GPU package of this environment is built for, without importing it.

    `torch_cuda` is `torch.version.cuda` when the caller has torch imported (None: read from
    torch's version label). Keys: torch, cudnn, onnxruntime, tensorrt, ort_trt_provider, each a
    dict with "major" (CUDA major, or None) and "from" (the evidence), where installed."""
    out: dict[str, Any] = {}
    installed = _installed()
    torch_version = installed.get("torch")
    if torch_version is not None:
        if torch_cuda:
            out["torch"] = {"major": int(str(torch_cuda).split(".")[0]), "from": f"torch.version.cuda = {torch_cuda}"}
        else:
            major = major_from_name("torch", torch_version)
            runtime = _named(installed, "nvidia-cuda-runtime")
            if major is None and runtime:
                name, v = next(iter(runtime.items()))
                major = major_from_name(name, v)
            out["torch"] = {"major": major, "from": f"torch {torch_version}"}
    cudnn = _named(installed, "nvidia-cudnn")
    if cudnn:
        majors = {major_from_name(n) for n in cudnn}
        out["cudnn"] = {"major": majors.pop() if len(majors) == 1 else None,
                        "from": ", ".join(f"{n} {v}" for n, v in cudnn.items())}
        if len(cudnn) > 1:
            out["cudnn"]["conflict"] = sorted(cudnn)
    ort_gpu = installed.get("onnxruntime-gpu")
    if ort_gpu is not None:
        for key, lib, so in (("onnxruntime", "libcudart", "libonnxruntime_providers_cuda.so"),
                             ("ort_trt_provider", "libnvinfer", "libonnxruntime_providers_tensorrt.so")):
            path = _package_file("onnxruntime-gpu", so)
            entry: dict[str, Any] = {"major": None, "from": f"onnxruntime-gpu {ort_gpu}: {so} not found"}
            if path is not None:
                try:
                    needed = elf_needed(path)
                    entry = {"major": needed_major(needed, lib), "from": f"{so} needs "
                             + ", ".join(n for n in needed if n.startswith((lib, "libcudart", "libcudnn")))}
                    if key == "ort_trt_provider":
                        entry["cuda_major"] = needed_major(needed, "libcudart")
                except (OSError, ValueError) as e:
                    entry["from"] = f"{so}: {e}"
            out[key] = entry
    trt = {n: v for n, v in _named(installed, "tensorrt").items() if major_from_name(n) is not None}
    if trt:
        majors = {major_from_name(n) for n in trt}
        version = next(iter(trt.values()))
        out["tensorrt"] = {"major": majors.pop() if len(majors) == 1 else None, "version": version,
                           "from": ", ".join(f"{n} {v}" for n, v in sorted(trt.items()))}
    return out


@dataclass
class Finding:
    """One problem with this environment's GPU stack, and the command that fixes it."""

    what: str
    fix: str


def stack_findings(majors: dict[str, Any], driver_cuda: str | None = None) -> list[Finding]:
    """Mismatches between the CUDA majors of torch, ONNX Runtime, TensorRT and cuDNN, the
    TensorRT major ONNX Runtime's TensorRT provider links, and the driver."""
    out: list[Finding] = []
    named = {k: v["major"] for k, v in majors.items() if k in ("torch", "cudnn", "onnxruntime", "tensorrt")
             and v.get("major") is not None}
    target = named.get("torch") or (max(named.values()) if named else None)
    stack = STACKS.get(target or 0)
    reinstall = (f"reinstall one stack: pip uninstall -y onnxruntime-gpu tensorrt tensorrt-cu12 tensorrt-cu13 "
                 f"tensorrt-cu12-libs tensorrt-cu13-libs && {stack['install']}" if stack else
                 "reinstall one stack (README, GPU section)")
    if len(set(named.values())) > 1:
        listing = ", ".join(f"{k} CUDA {v}" for k, v in named.items())
        out.append(Finding(f"CUDA majors differ: {listing}", reinstall))
    if "conflict" in majors.get("cudnn", {}):
        out.append(Finding(f"two cuDNN builds installed: {', '.join(majors['cudnn']['conflict'])}", reinstall))
    provider, trt = majors.get("ort_trt_provider"), majors.get("tensorrt")
    if provider and trt and provider.get("major") is not None and trt.get("major") is not None:
        trt_major = Version(trt["version"]).major
        if provider["major"] != trt_major:
            out.append(Finding(
                f"ONNX Runtime's TensorRT provider links libnvinfer.so.{provider['major']} but TensorRT {trt['version']} "
                f"is installed: `--backend ort --device trt` cannot start",
                "use --backend trt (engines built by rpiae), or the CUDA 12 stack, whose onnxruntime-gpu and "
                "TensorRT are both 10.x"))
    if driver_cuda and target:
        try:
            if int(str(driver_cuda).split(".")[0]) < target:
                out.append(Finding(f"the NVIDIA driver supports CUDA {driver_cuda}, the packages need CUDA {target}",
                                   f"update the driver to >= {STACKS[target]['driver']}, or install the CUDA "
                                   f"{12 if target == 13 else target} stack" if target in STACKS else "update the driver"))
        except ValueError:
            pass
    return out


# -- the constraints files against the published metadata -------------------------------------------
PYPI = "https://pypi.org/simple"


class Unreachable(OSError):
    """The package index could not be reached (no network): the check is skipped, not failed."""


def read_constraints(path: str | Path) -> dict[str, str]:
    """{canonical name: version} of a constraints file's `name==version` lines."""
    pins = {}
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        if len(spec) != 1 or spec[0].operator != "==":
            raise ValueError(f"{path}: {line!r} is not a `name==version` pin")
        pins[canonicalize_name(req.name)] = spec[0].version
    return pins


class _RangeFile(io.RawIOBase):
    """A remote file read with HTTP range requests (a wheel's zip directory and one member)."""

    def __init__(self, url: str, size: int, opener: Callable = urllib.request.urlopen) -> None:
        self.url, self.size, self.pos, self.opener = url, size, 0, opener

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def readinto(self, b) -> int:
        n = min(len(b), self.size - self.pos)
        if n <= 0:
            return 0
        req = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-{self.pos + n - 1}"})
        with self.opener(req, timeout=60) as r:
            data = r.read()
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


@dataclass
class Published:
    """What an index publishes for one pinned release: its requirements, and for wheels the
    members asked for (shared objects, by file name)."""

    name: str
    version: str
    filename: str
    requires: list[str]
    libraries: dict[str, list[str]] = field(default_factory=dict)  # member file name -> DT_NEEDED


def _python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


def _pick(files: list[dict[str, Any]], name: str, version: str) -> dict[str, Any] | None:
    """This interpreter's manylinux x86_64 wheel of (name, version), else a pure wheel, else the sdist."""
    wanted = Version(version)
    wheels, sdists = [], []
    for f in files:
        fn = f["filename"]
        try:
            if fn.endswith(".whl"):
                _, v, _, tags = parse_wheel_filename(fn)
                if v == wanted:
                    wheels.append((f, tags))
            elif fn.endswith((".tar.gz", ".zip")):
                _, v = parse_sdist_filename(fn)
                if v == wanted:
                    sdists.append(f)
        except ValueError:
            continue
    py = _python_tag()
    for accept in (lambda t: t.interpreter == py and "manylinux" in t.platform and "x86_64" in t.platform,
                   lambda t: t.platform == "any",
                   lambda t: "manylinux" in t.platform and "x86_64" in t.platform):
        for f, tags in wheels:
            if any(accept(t) for t in tags):
                return f
    return sdists[0] if sdists else None


def fetch_published(name: str, version: str, libraries: tuple[str, ...] = (), index: str = PYPI,
                    opener: Callable = urllib.request.urlopen) -> Published:
    """Read (name, version)'s published metadata from a PEP 691 index: a wheel's METADATA by
    HTTP range requests (a few kB of a wheel of hundreds of MB), an sdist's PKG-INFO; and the
    DT_NEEDED entries of the wheel members whose file names end in `libraries`."""
    req = urllib.request.Request(f"{index}/{canonicalize_name(name)}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with opener(req, timeout=60) as r:
            files = json.load(r)["files"]
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise LookupError(f"{name} is not on {index}") from None
        raise Unreachable(f"{index}: HTTP {e.code}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise Unreachable(f"{index} is not reachable: {getattr(e, 'reason', e)}") from None
    f = _pick(files, name, version)
    if f is None:
        raise LookupError(f"{name}=={version}: no Linux x86-64 wheel nor sdist on {index}")
    fn = f["filename"]
    libs: dict[str, list[str]] = {}
    if fn.endswith(".whl"):
        z = zipfile.ZipFile(io.BufferedReader(_RangeFile(f["url"], int(f["size"]), opener), 1 << 16))
        member = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(member).decode()
        for n in z.namelist():
            if libraries and n.endswith(libraries):
                libs[n.rsplit("/", 1)[-1]] = elf_needed(z.read(n))
    else:
        with opener(urllib.request.Request(f["url"]), timeout=60) as r:
            data = r.read()
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            member = min((m for m in t.getmembers() if m.name.endswith("PKG-INFO")), key=lambda m: m.name.count("/"))
            text = t.extractfile(member).read().decode()  # type: ignore[union-attr]
    requires = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]
    return Published(canonicalize_name(name), version, fn, requires, libs)


@dataclass
class StackReport:
    """The outcome of checking one constraints file."""

    path: str
    major: int
    checked: list[str] = field(default_factory=list)  # "name==version (file): CUDA n"
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, text: str) -> None:
        items = getattr(self, kind)
        if text not in items:
            items.append(text)


# ONNX Runtime's provider libraries, read from its wheel to prove which CUDA and TensorRT it links
ORT_LIBRARIES = ("libonnxruntime_providers_tensorrt.so",)


def check_stack(path: str | Path, major: int, fetch: Callable[..., Published] = fetch_published) -> StackReport:
    """Check one constraints file: every pinned package, every CUDA-bearing requirement of a
    pinned package (with the extras asked for), and ONNX Runtime's TensorRT provider library
    are built for CUDA `major`; every CUDA-bearing requirement is pinned, and by a version its
    specifier admits. Pins with a local label (`+cu126`) live on another index: their CUDA
    major is their label, their metadata is not read (recorded under `skipped`)."""
    report = StackReport(str(path), major)
    pins = read_constraints(path)
    env = {**default_environment(), "platform_system": "Linux", "platform_machine": "x86_64",
           "sys_platform": "linux", "os_name": "posix"}
    trt_major = next((Version(v).major for n, v in pins.items() if n.startswith("tensorrt")), None)
    # what is asked of each pin: its extras (a pin is installed with the extras some requirer asks for)
    extras: dict[str, set[str]] = {n: set() for n in pins}
    queue, seen = list(pins), set()
    published: dict[str, Published] = {}
    while queue:
        name = queue.pop(0)
        key = (name, tuple(sorted(extras.get(name, ()))))
        if key in seen:
            continue
        seen.add(key)
        version = pins[name]
        own = major_from_name(name, version)
        if own is not None and own != major:
            report.add("problems", f"{name}=={version} is a CUDA {own} package")
        if "+" in version:
            report.skipped.append(f"{name}=={version}: published on its own index (the stack's --extra-index-url), "
                                  f"not read here; CUDA {own} by its local label")
            continue
        if name not in published:
            try:
                published[name] = fetch(name, version, ORT_LIBRARIES if name == "onnxruntime-gpu" else ())
            except LookupError as e:
                report.add("problems", str(e))
                continue
        pub = published[name]
        majors_seen = set()
        for text in pub.requires:
            req = Requirement(text)
            wanted = extras.get(name, set()) or {""}
            if req.marker is not None and not any(req.marker.evaluate({**env, "extra": x}) for x in wanted):
                continue
            dep = canonicalize_name(req.name)
            if not cuda_bearing(dep):
                continue
            m = major_from_requirement(req)
            if m is not None:
                majors_seen.add(m)
                if m != major:
                    report.add("problems", f"{name}=={version} requires {text} (CUDA {m})")
            if dep not in pins:
                report.add("problems", f"{name}=={version} requires {req.name}{req.specifier or ''}, "
                                       f"which {Path(path).name} does not pin")
                continue
            if req.specifier and not req.specifier.contains(Version(pins[dep]), prereleases=True):
                report.add("problems", f"{name}=={version} requires {req.name}{req.specifier}; "
                                       f"{Path(path).name} pins {pins[dep]}")
            if req.extras - extras[dep]:
                extras[dep] |= req.extras
            queue.append(dep)
        report.checked.append(f"{name}=={version} ({pub.filename})"
                              + (f": CUDA {own}" if own is not None else
                                 f": requires CUDA {', '.join(map(str, sorted(majors_seen)))}" if majors_seen else ""))
        for lib, needed in pub.libraries.items():
            cudart, nvinfer = needed_major(needed, "libcudart"), needed_major(needed, "libnvinfer")
            if cudart is not None and cudart != major:
                report.add("problems", f"{name}=={version}: {lib} links libcudart.so.{cudart}")
            if nvinfer is not None:
                line = f"{name}=={version}: {lib} links libcudart.so.{cudart}, libnvinfer.so.{nvinfer}"
                if trt_major is not None and nvinfer != trt_major:
                    line += (f"; this stack pins TensorRT {trt_major}, so ONNX Runtime's TensorRT provider cannot "
                             f"start here (rpiae's own TensorRT engines, --backend trt, can)")
                report.add("notes", line)
    return report


def render_stack(report: StackReport) -> str:
    lines = [f"{report.path} (CUDA {report.major}): " + ("ok" if report.ok else f"{len(report.problems)} problem(s)")]
    lines += [f"  checked  {c}" for c in report.checked]
    lines += [f"  skipped  {s}" for s in report.skipped]
    lines += [f"  note     {n}" for n in report.notes]
    lines += [f"  PROBLEM  {p}" for p in report.problems]
    return "\n".join(lines)


def constraints_dir() -> Path:
    """The repository's constraints folder (an editable install or a checkout)."""
    return REPO / "constraints"
