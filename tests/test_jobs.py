"""The jobs layer (`rpiae.jobs`): one engine open per job, the encode job as a library call,
and what a job records about the model it ran."""

from __future__ import annotations

import numpy as np
import pytest

from rpiae.engines import load_backend
from rpiae.export import Bundle
from rpiae.export.bundle import model_info
from rpiae.imageio import load_images, save_image
from rpiae.jobs import job_model, open_engine
from rpiae.jobs.encode import EncodeError, encode_files


def test_a_job_opens_its_bundle_once(bundle_all, monkeypatch):
    opened = []
    real_open = Bundle.open.__func__

    def counting(cls, path):
        opened.append(str(path))
        return real_open(cls, path)

    monkeypatch.setattr(Bundle, "open", classmethod(counting))
    with open_engine(str(bundle_all.root), "ort", "fp32") as be:
        info = job_model(be, str(bundle_all.root))
    assert opened == [str(bundle_all.root)]  # by load_backend; the job's record reads what it opened
    monkeypatch.undo()
    assert info == model_info(bundle_all.root) and info["config"] == bundle_all.config.to_dict()


def test_job_model_of_a_checkpoint_names_its_latent_stats(tiny_ckpt, tmp_path):
    stats = tmp_path / "stats.pt"
    stats.write_bytes(b"not read here")
    with open_engine(tiny_ckpt, "torch") as be:
        info = job_model(be, tiny_ckpt, latent_stats=None)
        assert info["path"] == tiny_ckpt and len(info["sha256"]) == 64 and info["config"]["family"] == "rpiae"
        assert "latent_stats" not in info
        assert job_model(be, tiny_ckpt, stats)["latent_stats"]["path"] == str(stats)


def test_open_engine_refuses_ray_options_for_the_local_engine(tiny_ckpt):
    with pytest.raises(ValueError, match="--address and --workers-per-gpu go with --engine ray"):
        open_engine(tiny_ckpt, "torch", address="head:6379")
    with pytest.raises(ValueError, match="unknown engine 'slurm'; choose one of: local, ray"):
        open_engine(tiny_ckpt, "torch", engine="slurm")


def test_encode_files_writes_what_the_backend_computes(bundle_all, photos, tmp_path):
    files = [save_image(p, tmp_path / "img" / f"{i}.png") for i, p in enumerate(photos[:5])]
    out = tmp_path / "z.npy"
    with load_backend(bundle_all.root, "ort") as be:
        summary = encode_files([tmp_path / "img"], out, be, batch_size=2, progress=False)
        expected = be.encode(load_images(files))
    assert summary["images"] == 5 and summary["shape"] == (5, *bundle_all.config.latent_shape)
    z = np.load(out)
    assert z.dtype == np.float32 and z.shape == summary["shape"]
    np.testing.assert_allclose(z, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_encode_files_leaves_nothing_on_a_bad_image(bundle_all, photos, tmp_path):
    save_image(photos[0], tmp_path / "img" / "a.png")
    (tmp_path / "img" / "b.png").write_bytes(b"not a png")
    out = tmp_path / "z.npy"
    with load_backend(bundle_all.root, "ort") as be, pytest.raises(EncodeError, match=r"b\.png.*nothing was written"):
        encode_files([tmp_path / "img"], out, be, progress=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_backend_check_takes_the_graphs_input_range(tiny_ckpt):
    """`Backend.check(graph, x, value_range)`: one pass over x for NaN/Inf and the range (what a
    Triton python model checks per request, from the GraphSpec's `input_range`)."""
    import torch

    from rpiae.engines import InputError
    from rpiae.export.spec import graph_spec

    with load_backend(tiny_ckpt, "torch") as be:
        spec = graph_spec(be.config, "encode")
        assert spec.input_range == (0.0, 1.0) and graph_spec(be.config, "decode").input_range is None
        good = spec.sample(2)
        be.check("encode", good, spec.input_range)
        for x in (good * 1.5, good.numpy() * 1.5):
            with pytest.raises(InputError, match=r"images: values must lie in \[0, 1\], got \[[0-9.e-]+, 1\.[0-9]+\]"):
                be.check("encode", x, spec.input_range)
        be.check("encode", good * 1.5)  # no range asked: only shape, dtype, NaN/Inf
        bad = good.clone()
        bad[0, 0, 0, 0] = float("nan")
        with pytest.raises(InputError, match="contains NaN or Inf"):
            be.check("encode", bad, spec.input_range)
        with pytest.raises(InputError, match="contains NaN or Inf"):
            be.check("encode", torch.full_like(good, float("inf")))


def test_each_job_opens_only_the_graph_it_runs(bundle_all, tmp_path, monkeypatch, sample_photos):
    """`rpiae encode`/`extract` never load the decoder's graph, `rpiae decode` never the
    encoder's (on TensorRT: no engine, no GPU memory for the graph a job does not run)."""
    from click.testing import CliRunner

    from rpiae.cli.main import main

    resolved = []
    real = Bundle.graph_path

    def recording(self, graph, precision, *args, **kwargs):
        resolved.append(graph)
        return real(self, graph, precision, *args, **kwargs)

    monkeypatch.setattr(Bundle, "graph_path", recording)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, img in enumerate(sample_photos[:2]):
        save_image(img, photos / f"p{i}.png")
    root = str(bundle_all.root)

    def run(*args):
        resolved.clear()
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return sorted(set(resolved))

    assert run("encode", "-m", root, "-b", "ort", photos, "-o", tmp_path / "z.npy") == ["encode"]
    assert run("extract", "-m", root, "-b", "ort", photos, "--out", tmp_path / "lat", "--quiet") == ["encode"]
    assert run("decode", "-m", root, "-b", "ort", tmp_path / "z.npy", "-o", tmp_path / "png", "--quiet") == ["decode"]
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [".rpiae-decode.json", "000000.png", "000001.png"]


def test_a_torch_engine_for_one_graph_holds_only_its_modules(tiny_ckpt, photos):
    import torch

    from rpiae.devices import BackendUnavailable
    from rpiae.model import RPiAE

    full = RPiAE.from_checkpoint(tiny_ckpt)
    x = photos[:2]
    with open_engine(tiny_ckpt, "torch", graphs=("encode",)) as be:
        assert be.model.decoder is None and be.model.vb_feature_decoder is None
        assert be.model.encoder is not None and be.describe()["graphs"] == ["encode"]
        held = sum(p.numel() for p in be.model.parameters())
        with torch.inference_mode():
            np.testing.assert_array_equal(be.encode(x), full.encode(torch.from_numpy(x)).numpy())
        with pytest.raises(BackendUnavailable, match="decode"):
            be.decode(np.zeros((1, *full.config.latent_shape), np.float32))
    assert held < sum(p.numel() for p in full.parameters())
    with pytest.raises(ValueError, match="graphs"):
        open_engine(tiny_ckpt, "torch", graphs=("both",))
