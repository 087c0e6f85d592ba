"""`rpiae eval`: metrics against independent computations, FID from streamed moments, the
Inception feature network in torch-fidelity's weight layout, weight discovery, the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from rpiae.jobs.evaluate import EvalError, EvalOptions, MetricNets, evaluate, find_metric_weights, load_metric_nets
from rpiae.data.sources import open_source
from rpiae.metrics import FeatureMoments, fid, frechet_distance


def cli(*args):
    from rpiae.cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(r, needle: str, code: int = 1) -> None:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and needle in errors[0], r.output


@pytest.fixture(autouse=True)
def empty_torch_home(tmp_path, monkeypatch):
    """No weights in torch hub's cache unless a test puts them there."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "torch-home" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, photos):
    """The real photos as 256x256 PNGs: the ADM crop leaves them as they are."""
    d = tmp_path_factory.mktemp("eval-photos")
    for i, x in enumerate(photos):
        Image.fromarray(np.round(x.transpose(1, 2, 0) * 255).astype(np.uint8)).save(d / f"{i}.png")
    return d


def read_pngs(d) -> np.ndarray:
    """(N, H, W, 3) uint8, sorted by name, read with PIL alone."""
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(d.glob("*.png"))])


class KnownDegradation:
    """A stand-in backend whose reconstruction is known in closed form: encode keeps the
    image, decode returns gain * x + offset + sigma * a fixed noise pattern."""

    def __init__(self, sigma: float, gain: float = 1.0, offset: float = 0.0, seed: int = 0) -> None:
        self.sigma, self.gain, self.offset = sigma, gain, offset
        self.pattern = torch.from_numpy(np.random.default_rng(seed).normal(size=(3, 256, 256))).float()

    def encode(self, x):
        return x.clone()

    def decode(self, z):
        return self.gain * z + self.offset + self.sigma * self.pattern

    def expected(self, originals_u8: np.ndarray) -> np.ndarray:
        """The reconstruction of 8-bit originals (N, H, W, 3) as the 8-bit image a PNG would hold."""
        x = torch.from_numpy(originals_u8).permute(0, 3, 1, 2).float() / 255  # float32, as the loader gives them
        y = self.decode(self.encode(x)).numpy().transpose(0, 2, 3, 1)
        return np.round(np.clip(y, 0, 1) * 255).astype(np.uint8)


class SmallFeatures(torch.nn.Module):
    """A small seeded feature extractor (uint8 images -> (N, 24)): convolutions at two scales,
    global standard deviation and mean (x 100). Stands in for Inception-v3 wherever FID is tested.
    `dims` keeps the first features only (fewer dimensions than images: a full-rank covariance)."""

    def __init__(self, seed: int = 0, dims: int = 24) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(6, 3, 5, 5, generator=g) / 8
        self.w2 = torch.randn(6, 6, 3, 3, generator=g) / 4
        self.dims = dims

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1
        a = torch.tanh(torch.nn.functional.conv2d(x, self.w1, stride=2))
        b = torch.tanh(torch.nn.functional.conv2d(a, self.w2, stride=2))
        return 100 * torch.cat([a.std((2, 3)), b.std((2, 3)), a.mean((2, 3)), b.mean((2, 3))], 1)[:, : self.dims]


def photo_patches(photos: np.ndarray, n: int, seed: int = 0) -> torch.Tensor:
    """n random 64x64 uint8 patches of the real photos, (n, 3, 64, 64)."""
    rng = np.random.default_rng(seed)
    u8 = np.round(photos * 255).astype(np.uint8)
    out = []
    for _ in range(n):
        i, t, left = rng.integers(len(u8)), rng.integers(0, 192), rng.integers(0, 192)
        out.append(u8[i, :, t : t + 64, left : left + 64])
    return torch.from_numpy(np.stack(out))


def direct_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID from all features at once: np.mean / np.cov, and the trace of the square root from
    the eigenvalues of the product (torch-fidelity's formula) instead of scipy's sqrtm."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    tr_covmean = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# -- FID and streaming moments -----------------------------------------------------------------


def test_streaming_moments_equal_the_moments_of_all_features_at_once(photos):
    feats = SmallFeatures()(photo_patches(photos, 240)).double().numpy() + 50.0  # far from zero: a naive sum would lose digits
    m = FeatureMoments(feats.shape[1])
    sizes = [1, 7, 0, 64, 3, 100, 65]
    start = 0
    for s in sizes:  # uneven batches, an empty one, torch tensors and numpy arrays
        m.update(torch.from_numpy(feats[start : start + s]) if s % 2 else feats[start : start + s])
        start += s
    assert start == len(feats) and m.count == len(feats)
    np.testing.assert_allclose(m.mean, feats.mean(0), rtol=0, atol=1e-11)
    np.testing.assert_allclose(m.cov, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-13)
    with pytest.raises(ValueError, match="expected features"):
        m.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureMoments(3).update(np.ones((1, 3))).cov


def test_fid_is_zero_on_itself_grows_with_noise_and_equals_a_direct_computation(photos):
    net = SmallFeatures()
    patches = photo_patches(photos, 300)
    real = net(patches).double().numpy()
    m_real = FeatureMoments(real.shape[1]).update(real)
    assert abs(fid(m_real, m_real)) < 1e-6
    rng = np.random.default_rng(1)
    values = []
    for sigma in (4, 12, 36):
        noisy_u8 = np.clip(patches.numpy() + rng.normal(0, sigma, patches.shape), 0, 255).round().astype(np.uint8)
        noisy = net(torch.from_numpy(noisy_u8)).double().numpy()
        m_noisy = FeatureMoments(noisy.shape[1])
        for chunk in np.array_split(noisy, 7):  # streamed in uneven batches
            m_noisy.update(chunk)
        values.append(fid(m_noisy, m_real))
        assert values[-1] == pytest.approx(direct_fid(noisy, real), rel=1e-6, abs=1e-9)
    assert 0 < values[0] < values[1] < values[2], values
    # a pure shift of the means: FID is the squared distance between them
    assert frechet_distance([0, 0], np.eye(2), [3, 4], np.eye(2)) == pytest.approx(25.0)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# -- metrics of the evaluation against independent computations ----------------------------------


def test_psnr_ssim_and_rfid_of_each_row_match_independent_computations(photo_dir, tmp_path):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    originals = read_pngs(photo_dir)
    variants = {
        ("torch", "fp32"): KnownDegradation(0.01, seed=1),
        ("ort", "fp16"): KnownDegradation(0.03, seed=2),
        ("ort", "int8"): KnownDegradation(0.02, gain=0.9, offset=0.04, seed=3),
    }
    net = SmallFeatures(dims=5)  # 8 photos: 5 features keep the covariances full rank
    nets = MetricNets(inception=net, skipped={"lpips": "skipped: --lpips-weights VGG16 [HEADS] (test)"})
    report = evaluate(open_source(photo_dir), list(variants.items()), nets, EvalOptions(batch_size=3, workers=0),
                      json_out=tmp_path / "r.json", progress=False)
    rows = {(r["backend"], r["precision"]): r for r in report["rows"]}
    assert list(rows) == list(variants) and report["rows"][0]["reference"]
    x = originals.astype(np.float64) / 255
    real_feats = net(torch.from_numpy(originals).permute(0, 3, 1, 2)).double().numpy()
    expected = {}
    for name, be in variants.items():
        y8 = be.expected(originals)
        y = y8.astype(np.float64) / 255
        p = np.mean([peak_signal_noise_ratio(x[i], y[i], data_range=1.0) for i in range(len(x))])
        # scikit-image's SSIM map averaged over the whole image, as torchmetrics averages it
        # (scikit-image's own mean leaves out a 5-pixel border)
        s = np.mean([structural_similarity(x[i], y[i], channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False, full=True)[1].mean() for i in range(len(x))])
        f = direct_fid(net(torch.from_numpy(y8).permute(0, 3, 1, 2)).double().numpy(), real_feats)
        expected[name] = (p, s, f)
        row = rows[name]
        assert row["n"] == len(originals)
        assert row["psnr"] == pytest.approx(p, abs=1e-6)
        assert row["ssim"] == pytest.approx(s, abs=1e-3)  # the border pixels' windows are padded differently
        assert row["rfid"] == pytest.approx(f, rel=1e-6)
        assert row["lpips"].startswith("skipped: --lpips-weights")
    ref = expected[("torch", "fp32")]
    for name, (p, s, f) in expected.items():
        d = rows[name]["delta"]
        assert d["psnr"] == pytest.approx(p - ref[0], abs=1e-6) and d["rfid"] == pytest.approx(f - ref[2], rel=1e-4, abs=1e-6)
        assert d["lpips"] is None
    assert expected[("ort", "fp16")][0] < ref[0] - 5  # the three differ clearly: a mixed-up row would show
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == json.loads(json.dumps(report["rows"]))


def test_lpips_column_is_the_projects_lpips_on_the_8bit_images(photo_dir):
    from rpiae.training.lpips import LPIPS

    torch.manual_seed(0)
    net = LPIPS(channels=(8, 8, 16, 16, 16))  # narrow, same structure
    for p in net.parameters():
        p.data.uniform_(0.0, 0.1)
    originals = read_pngs(photo_dir)[:4]
    be = KnownDegradation(0.05)
    report = evaluate(open_source(photo_dir), [(("torch", "fp32"), be)], MetricNets(lpips=net, skipped={"rfid": "skipped: x"}),
                      EvalOptions(batch_size=4, workers=0, limit=4), progress=False)
    to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1  # noqa: E731
    direct = net(to_t(be.expected(originals)), to_t(originals)).double().mean().item()
    assert report["rows"][0]["lpips"] == pytest.approx(direct, rel=1e-5) and direct > 0


# -- the Inception feature network ----------------------------------------------------------------


def inception_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`, written out
    from the Inception-v3 architecture (block names as its TensorFlow-graph converter maps them)."""
    convs = {"Conv2d_1a_3x3": (32, 3, 3, 3), "Conv2d_2a_3x3": (32, 32, 3, 3), "Conv2d_2b_3x3": (64, 32, 3, 3),
             "Conv2d_3b_1x1": (80, 64, 1, 1), "Conv2d_4a_3x3": (192, 80, 3, 3)}
    for name, c, pool in (("5b", 192, 32), ("5c", 256, 64), ("5d", 288, 64)):
        convs.update({f"Mixed_{name}.{k}": v for k, v in {
            "branch1x1": (64, c, 1, 1), "branch5x5_1": (48, c, 1, 1), "branch5x5_2": (64, 48, 5, 5),
            "branch3x3dbl_1": (64, c, 1, 1), "branch3x3dbl_2": (96, 64, 3, 3), "branch3x3dbl_3": (96, 96, 3, 3),
            "branch_pool": (pool, c, 1, 1)}.items()})
    convs.update({"Mixed_6a.branch3x3": (384, 288, 3, 3), "Mixed_6a.branch3x3dbl_1": (64, 288, 1, 1),
                  "Mixed_6a.branch3x3dbl_2": (96, 64, 3, 3), "Mixed_6a.branch3x3dbl_3": (96, 96, 3, 3)})
    for name, c7 in (("6b", 128), ("6c", 160), ("6d", 160), ("6e", 192)):
        convs.update({f"Mixed_{name}.{k}": v for k, v in {
            "branch1x1": (192, 768, 1, 1), "branch7x7_1": (c7, 768, 1, 1), "branch7x7_2": (c7, c7, 1, 7),
            "branch7x7_3": (192, c7, 7, 1), "branch7x7dbl_1": (c7, 768, 1, 1), "branch7x7dbl_2": (c7, c7, 7, 1),
            "branch7x7dbl_3": (c7, c7, 1, 7), "branch7x7dbl_4": (c7, c7, 7, 1), "branch7x7dbl_5": (192, c7, 1, 7),
            "branch_pool": (192, 768, 1, 1)}.items()})
    convs.update({"Mixed_7a.branch3x3_1": (192, 768, 1, 1), "Mixed_7a.branch3x3_2": (320, 192, 3, 3),
                  "Mixed_7a.branch7x7x3_1": (192, 768, 1, 1), "Mixed_7a.branch7x7x3_2": (192, 192, 1, 7),
                  "Mixed_7a.branch7x7x3_3": (192, 192, 7, 1), "Mixed_7a.branch7x7x3_4": (192, 192, 3, 3)})
    for name, c in (("7b", 1280), ("7c", 2048)):
        convs.update({f"Mixed_{name}.{k}": v for k, v in {
            "branch1x1": (320, c, 1, 1), "branch3x3_1": (384, c, 1, 1), "branch3x3_2a": (384, 384, 1, 3),
            "branch3x3_2b": (384, 384, 3, 1), "branch3x3dbl_1": (448, c, 1, 1), "branch3x3dbl_2": (384, 448, 3, 3),
            "branch3x3dbl_3a": (384, 384, 1, 3), "branch3x3dbl_3b": (384, 384, 3, 1), "branch_pool": (192, c, 1, 1)}.items()})
    layout = {}
    for block, shape in convs.items():
        layout[f"{block}.conv.weight"] = shape
        for t in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{block}.bn.{t}"] = (shape[0],)
    layout["fc.weight"], layout["fc.bias"] = (1008, 2048), (1008,)
    return layout


def random_inception_file(path, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in inception_layout().items():
        if k.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            sd[k] = torch.randn(shape, generator=g) * (2 / fan_in) ** 0.5
        elif k.endswith("running_var"):
            sd[k] = 1 + torch.rand(shape, generator=g)
        elif k.endswith("bn.weight"):
            sd[k] = 0.5 + torch.rand(shape, generator=g)
        else:
            sd[k] = 0.1 * torch.randn(shape, generator=g)
    torch.save(sd, path)
    return sd


def test_inception_loads_the_real_key_layout_strictly_and_gives_2048_features(tmp_path, photos):
    from rpiae.checkpoints import CheckpointError
    from rpiae.inception import WEIGHTS_FILE, load_inception

    path = tmp_path / WEIGHTS_FILE
    sd = random_inception_file(path)
    assert len(sd) == 94 * 5 + 2  # 94 conv+BN blocks, the classifier
    net = load_inception(path)
    images = torch.from_numpy(np.round(photos[:3] * 255).astype(np.uint8))
    feats = net(images)
    assert feats.shape == (3, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and (feats >= 0).all() and feats.std() > 0  # after ReLU and the mean pool
    # the last 192 features are Mixed_7c's pool branch: changing its weights changes them only
    sd["Mixed_7c.branch_pool.conv.weight"] = -sd["Mixed_7c.branch_pool.conv.weight"]
    torch.save(sd, path)
    other = load_inception(path)(images)
    assert torch.equal(other[:, :-192], feats[:, :-192]) and not torch.allclose(other[:, -192:], feats[:, -192:])
    # strict: a missing or an extra key is an error that names it; BatchNorm's step counter is not
    torch.save({**sd, **{k.replace("running_var", "num_batches_tracked"): torch.tensor(0) for k in sd if "running_var" in k}},
               path)
    load_inception(path)
    torch.save({k: v for k, v in sd.items() if k != "Mixed_6b.branch7x7_2.bn.running_mean"}, path)
    with pytest.raises(CheckpointError, match="missing keys: Mixed_6b.branch7x7_2.bn.running_mean"):
        load_inception(path)
    torch.save({**sd, "AuxLogits.fc.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="unexpected keys: AuxLogits.fc.weight"):
        load_inception(path)
    with pytest.raises(ValueError, match="uint8"):
        net(images.float())


def test_resize_is_tensorflow1_bilinear():
    from rpiae.inception import resize_bilinear_tf1

    # TF1 (align_corners=False): source position = i * in / out, no half-pixel offset; last neighbour clamped
    x = torch.tensor([0.0, 10.0, 20.0, 30.0]).view(1, 1, 1, 4).repeat(1, 1, 4, 1)
    y = resize_bilinear_tf1(x, 6)
    np.testing.assert_allclose(y[0, 0, 0].numpy(), [0, 20 / 3, 40 / 3, 20, 80 / 3, 30], rtol=0, atol=1e-5)
    assert torch.equal(y[0, 0, 0], y[0, 0, 5])  # constant along the other axis
    torch_resize = torch.nn.functional.interpolate(x, size=(6, 6), mode="bilinear", align_corners=False)
    assert not torch.allclose(torch_resize, y, atol=0.5)  # PyTorch's half-pixel resize is a different function


# -- weights: discovery, skips and --require -------------------------------------------------------


def test_missing_weights_are_skipped_with_what_to_supply_or_are_an_error_when_required(empty_torch_home):
    found, skipped = find_metric_weights()
    assert found == {}
    assert skipped["rfid"].startswith("skipped: --inception-weights") and str(empty_torch_home) in skipped["rfid"]
    assert skipped["lpips"].startswith("skipped: --lpips-weights") and "vgg16-397923af.pth" in skipped["lpips"]
    nets = load_metric_nets()
    assert nets.inception is None and nets.lpips is None and set(nets.skipped) == {"rfid", "lpips"}
    with pytest.raises(EvalError, match="rfid is required but --inception-weights"):
        load_metric_nets(require=["rfid"])
    with pytest.raises(ValueError, match="unknown metric psnr"):
        load_metric_nets(require=["psnr"])
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        find_metric_weights(inception_weights=empty_torch_home / "nope.pth")


def test_weights_are_found_in_torch_hubs_cache(empty_torch_home, tmp_path):
    from rpiae.inception import WEIGHTS_FILE
    from rpiae.training.lpips import LPIPS

    hub = empty_torch_home
    hub.mkdir(parents=True)
    random_inception_file(hub / WEIGHTS_FILE)
    full = LPIPS().state_dict()  # VGG16 shapes: torchvision's backbone file and the heads file, split as released
    torch.save({k: v for k, v in full.items() if k.startswith("features.")}, hub / "vgg16-397923af.pth")
    assert find_metric_weights()[1].keys() == {"lpips"}  # the heads are still missing
    torch.save({k: v for k, v in full.items() if k.startswith("lin")}, hub / "weights-vgg16-lpips.pth")
    found, skipped = find_metric_weights()
    assert skipped == {} and found["rfid"] == [hub / WEIGHTS_FILE]
    assert found["lpips"] == [hub / "vgg16-397923af.pth", hub / "weights-vgg16-lpips.pth"]
    nets = load_metric_nets(require=["rfid", "lpips"])
    assert nets.inception is not None and nets.lpips is not None
    assert [w["path"] for w in nets.weights["rfid"]] == [str(hub / WEIGHTS_FILE)]


# -- the command ----------------------------------------------------------------------------------


def test_cli_one_row_per_variant_with_the_reference_once(tmp_path, photo_dir, bundle_all):
    out = tmp_path / "r.json"
    r = cli("eval", photo_dir, "--model", bundle_all.root, "--backend", "torch,ort", "--precision", "fp32,fp16",
            "--limit", 3, "--workers", 0, "--quiet", "--json", out, "--grid", tmp_path / "g.png", "--grid-images", 2,
            "--save-reference", tmp_path / "ref.npz")
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    names = [(row["backend"], row["precision"]) for row in rep["rows"]]
    assert names == [("torch", "fp32"), ("torch", "fp16"), ("ort", "fp32"), ("ort", "fp16")]
    for row in rep["rows"]:
        assert {"backend", "precision", "n", "psnr", "ssim", "lpips", "rfid", "seconds", "delta"} <= set(row)
        assert row["n"] == 3 and row["requested"] and row["rfid"].startswith("skipped: --inception-weights")
    ort32 = rep["rows"][2]
    assert abs(ort32["delta"]["psnr"]) < 0.01 and ort32["delta"]["psnr"] == pytest.approx(ort32["psnr"] - rep["rows"][0]["psnr"])
    table = r.output.splitlines()
    assert table[0].split()[:3] == ["backend", "precision", "n"]
    assert [line.split()[0:2] for line in table[1:5]] == [["torch", "(ref)"], ["torch", "fp16"], ["ort", "fp32"], ["ort", "fp16"]]
    assert "lpips: skipped: --lpips-weights" in r.output
    with Image.open(tmp_path / "g.png") as g:  # originals, 4 variants, the difference map; 2 images
        assert g.size[1] == 6 * 256 and g.size[0] > 2 * 256
    ref = np.load(tmp_path / "ref.npz")["arr_0"]
    np.testing.assert_array_equal(ref, read_pngs(photo_dir)[:3])

    # only int8 asked for: the reference row is added and marked as not requested
    r = cli("eval", photo_dir, "--model", bundle_all.root, "--backend", "ort", "--precision", "int8", "--limit", 2,
            "--workers", 0, "--quiet", "--json", out)
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())["rows"]
    assert [(x["backend"], x["precision"], x["requested"]) for x in rows] == [("torch", "fp32", False), ("ort", "int8", True)]
    assert -1.0 < rows[1]["delta"]["psnr"] < 0.5


def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, photo_dir, trained_or_tiny_ckpt):
    d = tmp_path / "data"
    d.mkdir()
    for p in sorted(photo_dir.glob("*.png"))[:3]:
        (d / p.name).write_bytes(p.read_bytes())
    (d / "1.png").write_bytes(b"not a PNG")
    out, grid = tmp_path / "r.json", tmp_path / "g.png"
    common = ["--model", trained_or_tiny_ckpt, "--workers", 0, "--quiet", "--json", out, "--grid", grid]
    one_line_error(cli("eval", d, *common), "1.png: cannot read image")
    assert not out.exists() and not grid.exists() and list(tmp_path.glob(".*")) == []
    r = cli("eval", d, *common, "--skip-bad")
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["rows"][0]["n"] == 2 and [s["ref"] for s in rep["skipped_images"]] == ["1.png"]

    one_line_error(cli("eval", d, *common, "--require", "rfid,lpips"), "rfid is required but --inception-weights")
    one_line_error(cli("eval", d, *common, "--require", "fid"), "--require", code=2)
    one_line_error(cli("eval", d, *common, "--backend", "onnx"), "--backend", code=2)
    one_line_error(cli("eval", d, *common, "--backend", "ort"), "run `rpiae export")
    one_line_error(cli("eval", d, "--model", trained_or_tiny_ckpt, "--precision", "int8", "--workers", 0),
                   "torch backend runs fp32, fp16, bf16, not int8")
    one_line_error(cli("eval", d, "--model", trained_or_tiny_ckpt, "--grid", tmp_path / "g.jpg"), "give a .png file")
    one_line_error(cli("eval", tmp_path / "nowhere", "--model", trained_or_tiny_ckpt), "no such folder")
    r = cli("eval", "--help")
    assert r.exit_code == 0 and "--inception-weights" in r.output and "--require" in r.output


def test_eval_calls_each_backend_with_at_most_eval_batch_images(tmp_path, photos):
    """eval holds every variant's backend at once; its memory follows the per-call batch, so
    the default batch is the small EVAL_BATCH (8), not the dataset jobs' STREAM_BATCH (32)."""
    from rpiae.data import EVAL_BATCH, STREAM_BATCH

    class Recording(KnownDegradation):
        def __init__(self):
            super().__init__(sigma=0.0)
            self.batches = []

        def encode(self, x):
            self.batches.append(len(x))
            return super().encode(x)

    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(EVAL_BATCH + 5):
        Image.fromarray(np.round(photos[i % len(photos)].transpose(1, 2, 0) * 255).astype(np.uint8)).save(d / f"{i:02d}.png")
    be = Recording()
    evaluate(open_source(d), [(("torch", "fp32"), be)], opts=EvalOptions(workers=0), progress=False)
    assert EVAL_BATCH < STREAM_BATCH and be.batches == [EVAL_BATCH, 5]
