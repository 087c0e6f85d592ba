"""A real Triton Inference Server on the repository `rpiae triton --platform python` writes:
real photos through rpiae_encode, rpiae_decode and the ensemble over HTTP and gRPC with the
example client, equal to the same backend in-process; bad requests answered with Triton's
error while the server stays ready; a killed Python stub reloaded by the watchdog; no
process left behind.

The server is the one of RPIAE_TRITONSERVER or of the nvidia-pytriton wheel (see
`rpiae.engines.triton_server`); without either these tests skip with that reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rpiae.engines.base import InputError
from rpiae.engines.triton_server import TritonServer, find_tritonserver, missing_reason
from rpiae.export.triton import write_model_repository

pytest.importorskip("tritonclient.http", reason='tritonclient without HTTP support: pip install "tritonclient[grpc,http]"')
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_BATCH = 4
needs_server = pytest.mark.skipif(find_tritonserver() is None, reason=missing_reason())


def _client_example():
    spec = importlib.util.spec_from_file_location("triton_client", ROOT / "examples" / "triton_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def repo(tmp_path_factory, bundle_all):
    out = tmp_path_factory.mktemp("triton") / "model_repository"
    write_model_repository(bundle_all, out, precision="fp32", platform="python", backend="ort", max_batch=MAX_BATCH)
    return out


@pytest.fixture(scope="module")
def server(repo):
    if find_tritonserver() is None:
        pytest.skip(missing_reason())
    with TritonServer(repo, watchdog=True, extra_args=["--exit-timeout-secs=5"]) as s:
        yield s


@pytest.fixture(scope="module")
def reference(bundle_all):
    from rpiae.engines import load_backend

    with load_backend(bundle_all.root, backend="ort", precision="fp32") as backend:
        yield backend


@pytest.fixture(scope="module")
def sample_photo_files(tmp_path_factory):
    from rpiae.samples import write_sample_photos

    return write_sample_photos(tmp_path_factory.mktemp("photos"))


def _clients(server):
    return {"grpc": grpcclient.InferenceServerClient(server.grpc_url),
            "http": httpclient.InferenceServerClient(server.http_url)}


def _batched(fn, x, step=MAX_BATCH):
    """The in-process reference run in the batches the client sends (same shapes, same kernels)."""
    return np.concatenate([fn(x[i : i + step]) for i in range(0, len(x), step)])


# -- results -----------------------------------------------------------------------------------
@needs_server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_served_models_equal_the_backend_in_process(server, reference, sample_photos, protocol):
    client = _clients(server)[protocol]
    example = _client_example()
    photos = sample_photos[:6]  # two requests of the ensemble: 4 + 2
    z_ref = _batched(reference.encode, photos)
    x_ref = _batched(reference.decode, z_ref)

    both = example.infer(client, "rpiae", photos)
    assert set(both) == {"latent", "image"}
    np.testing.assert_allclose(both["latent"], z_ref, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.clip(both["image"], 0, 1), np.clip(x_ref, 0, 1))

    enc = example.infer(client, "rpiae_encode", photos)
    assert list(enc) == ["latent"]
    np.testing.assert_allclose(enc["latent"], z_ref, rtol=0, atol=1e-6)
    dec = example.infer(client, "rpiae_decode", z_ref)
    assert list(dec) == ["image"]
    np.testing.assert_array_equal(np.clip(dec["image"], 0, 1), np.clip(x_ref, 0, 1))


@needs_server
def test_client_example_command_writes_latents_and_images(server, reference, sample_photo_files, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "triton_client.py"), "--url", server.grpc_url,
                        "--model", "rpiae", "-o", str(out), *map(str, sample_photo_files[:3])],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    latents = np.load(out / "latent.npy")
    assert latents.shape == (3, 64, 16, 16)
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    from rpiae.imageio import load_images

    np.testing.assert_allclose(latents, reference.encode(load_images(sample_photo_files[:3])), rtol=0, atol=1e-6)
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "triton_client.py"), "--url", server.http_url,
                        "--protocol", "http", "--model", "rpiae_encode", "-o", str(tmp_path / "h"),
                        str(sample_photo_files[0])], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "h" / "latent.npy"), latents[:1], rtol=0, atol=1e-6)


# -- bad requests ------------------------------------------------------------------------------
def _request(module, name, array, datatype="FP32"):
    i = module.InferInput(name, list(array.shape), datatype)
    i.set_data_from_numpy(array)
    return i


@needs_server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_requests_get_tritons_error_and_the_server_stays_ready(server, sample_photos, protocol):
    client = _clients(server)[protocol]
    module = grpcclient if protocol == "grpc" else httpclient
    good = np.ascontiguousarray(sample_photos[:1])
    nan = good.copy()
    nan[0, 1, 5, 5] = np.nan
    bright = good * 255.0  # 8-bit values sent as floats
    latent_nan = np.zeros((1, 64, 16, 16), np.float32)
    latent_nan[0, 0, 0, 0] = np.inf
    cases = {
        "wrong shape": ("rpiae", [_request(module, "images", np.zeros((1, 3, 128, 128), np.float32))],
                        "unexpected shape"),
        "wrong dtype": ("rpiae", [_request(module, "images", good.astype(np.float64), "FP64")], "data-type"),
        "batch above max_batch_size": ("rpiae_encode", [_request(module, "images", np.repeat(good, MAX_BATCH + 1, 0))],
                                       "batch-size must be <= 4"),
        "NaN pixels": ("rpiae", [_request(module, "images", nan)], "NaN or Inf"),
        "out-of-range pixels": ("rpiae_encode", [_request(module, "images", bright)], "must lie in [0, 1]"),
        "Inf latent": ("rpiae_decode", [_request(module, "latent", latent_nan)], "NaN or Inf"),
        "unknown tensor name": ("rpiae", [_request(module, "pixels", good)], "pixels"),
    }
    example = _client_example()
    lines: list[str] = []
    with pytest.raises(InferenceServerException, match="NaN or Inf"):
        example.infer(client, "rpiae", nan, retries=3, backoff=5.0, report=lines.append)
    assert lines == []  # answered at once, not retried
    for what, (model, inputs, expected) in cases.items():
        with pytest.raises(InferenceServerException) as e:
            client.infer(model, inputs)
        assert expected in e.value.message(), f"{what}: {e.value.message()}"
        # refused as invalid (gRPC INVALID_ARGUMENT / HTTP 400), so the example client does not retry it
        assert example.deterministic(e.value), (what, e.value.status())
        assert client.is_server_ready() and client.is_model_ready(model), what
        answer = client.infer("rpiae", [_request(module, "images", good)])  # the next good request answers
        assert answer.as_numpy("image").shape == (1, 3, 256, 256), what


@needs_server
def test_a_bad_request_batched_with_good_ones_fails_alone(server, reference, sample_photos):
    """Requests the dynamic batcher puts together are checked one by one."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    good = np.ascontiguousarray(sample_photos[:2])
    bad = good[:1].copy()
    bad[0, 0, 0, 0] = np.nan
    results: dict[str, object] = {}

    def done(key):
        return lambda result, error: results.__setitem__(key, error if error is not None else result)

    for key, x in (("a", good[:1]), ("bad", bad), ("b", good[1:2])):
        client.async_infer("rpiae_encode", [_request(grpcclient, "images", x)], done(key))
    deadline = time.monotonic() + 120
    while len(results) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert isinstance(results["bad"], InferenceServerException) and "NaN" in results["bad"].message()
    for key, i in (("a", 0), ("b", 1)):
        np.testing.assert_allclose(results[key].as_numpy("latent"), reference.encode(good[i : i + 1]), rtol=0, atol=1e-6)


# -- faults and shutdown -----------------------------------------------------------------------
@needs_server
def test_a_killed_stub_is_reported_by_the_client_and_reloaded(server, sample_photos):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    example = _client_example()
    stubs = server.stubs()
    assert set(stubs) == {"rpiae_encode", "rpiae_decode"} and all(len(p) == 1 for p in stubs.values())
    os.kill(stubs["rpiae_encode"][0], signal.SIGKILL)
    lines: list[str] = []
    out = example.infer(client, "rpiae", sample_photos[:1], retries=8, backoff=0.5, report=lines.append)
    assert out["image"].shape == (1, 3, 256, 256)
    assert lines and all("\n" not in line for line in lines)
    assert "Stub process 'rpiae_encode_0_0' is not healthy" in lines[0] and "retry 1/8" in lines[0]
    assert [e["model"] for e in server.restarts] == ["rpiae_encode"] and server.restarts[0]["ok"]
    assert server.stubs()["rpiae_encode"] != stubs["rpiae_encode"]  # a new stub process
    assert server.is_ready()


@needs_server
def test_server_stops_leaving_no_process(repo):
    s = TritonServer(repo, extra_args=["--exit-timeout-secs=5"]).start()
    try:
        pids = s.group_pids()
        assert len(pids) == 3  # the server and one stub per python model
        regions = [Path("/dev/shm") / r for r in s._regions]
        assert len(regions) == 2 and all(r.is_file() for r in regions)
        os.kill(s.stubs()["rpiae_decode"][0], signal.SIGKILL)  # a killed stub cannot remove its region
    finally:
        s.close()
    assert s.process.poll() is not None
    assert s.group_pids() == []
    assert not [r for r in regions if r.exists()]
    assert not [pid for pid in pids if _alive(pid)]


@needs_server
def test_rpiae_serve_runs_until_terminated_and_leaves_no_process(repo, tmp_path):
    from rpiae.engines.triton_server import free_port

    http, grpc = free_port(), free_port()
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "rpiae.cli", "serve", str(repo), "--http-port", str(http), "--grpc-port", str(grpc),
           "--log", str(log), "--", "--exit-timeout-secs=5"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()  # the tritonserver command line
        assert f"--http-port={http}" in line and "--model-control-mode=explicit" in line and "--exit-timeout-secs=5" in line
        ready = proc.stderr.readline()
        assert ready.startswith("rpiae serve: ready") and f"localhost:{grpc}" in ready, ready
        client = httpclient.InferenceServerClient(f"localhost:{http}")
        assert client.is_model_ready("rpiae")
        server_pid = int(next(pid for pid in os.listdir("/proc") if pid.isdigit() and _is_server_of(pid, http)))
        stubs = [pid for pid in os.listdir("/proc") if pid.isdigit() and _is_stub_of(pid, server_pid)]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    assert code == 128 + signal.SIGTERM
    assert not _alive(server_pid)
    assert "successfully loaded 'rpiae_encode'" in log.read_text()
    assert stubs and not [pid for pid in stubs if _alive(pid)]


def _alive(pid) -> bool:
    """A process that exists and is not a zombie (a container's init may reap late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _is_server_of(pid: str, http_port: int) -> bool:
    return f"--http-port={http_port}" in _cmdline(pid) and "tritonserver" in _cmdline(pid).split(" ")[0]


def _is_stub_of(pid: str, server_pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return "triton_python_backend_stub" in _cmdline(pid) and int(stat[stat.rindex(")") + 2:].split()[1]) == server_pid


@needs_server
def test_a_repository_that_cannot_load_fails_with_the_servers_reason(tmp_path, repo):
    import shutil

    broken = tmp_path / "repo"
    shutil.copytree(repo, broken)
    (broken / "rpiae_encode" / "bundle" / "encode.fp32.onnx").write_bytes(b"not a graph")
    with pytest.raises(Exception, match="before it was ready") as e:
        TritonServer(broken, ready_timeout=120).start()
    assert "rpiae_encode" in str(e.value)


# -- the model without a server ----------------------------------------------------------------
def _args(repo: Path, model: str) -> dict:
    from rpiae.export.triton import parse_config
    from google.protobuf import json_format

    config = parse_config((repo / model / "config.pbtxt").read_text())
    return {"model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
            "model_repository": str(repo / model), "model_instance_kind": "CPU", "model_instance_device_id": "0"}


def test_graph_model_runs_each_request_and_fails_bad_ones_alone(repo, reference, sample_photos):
    from rpiae.engines.triton_python import GraphModel

    model = GraphModel(_args(repo, "rpiae_encode"))
    assert model.backend.graphs == ("encode",) and model.input_name == "images" and model.output_name == "latent"
    assert model.backend.spinning is False  # instances share the cores: idle ONNX Runtime threads must not spin
    good = torch.from_numpy(sample_photos[:3])
    bad = good[:1].clone()
    bad[0, 0, 0, 0] = 1.5
    out = model.run([good[:2], bad, good[2:3]])
    assert isinstance(out[1], InputError) and "[0, 1]" in str(out[1])
    np.testing.assert_allclose(out[0].numpy(), reference.encode(sample_photos[:2]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[2].numpy(), reference.encode(sample_photos[2:3]), rtol=0, atol=1e-6)
    with pytest.raises(Exception, match="opened for the encode graph only"):
        model.backend.decode(np.zeros((1, 64, 16, 16), np.float32))
    model.close()


def test_graph_model_refuses_a_config_without_its_parameters(repo):
    from rpiae.engines.triton_python import GraphModel

    args = _args(repo, "rpiae_decode")
    config = json.loads(args["model_config"])
    del config["parameters"]["rpiae_bundle"]
    with pytest.raises(ValueError, match="lacks the parameters rpiae_bundle"):
        GraphModel({**args, "model_config": json.dumps(config)})
