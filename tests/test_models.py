"""The reference networks: exact parameter counts, shapes, init, and the model folder."""

from __future__ import annotations

import pytest
import torch

from cyclegan.models import (
    GeneratorSpec,
    PatchDiscriminator,
    ResnetGenerator,
    count_parameters,
    init_weights,
    load_generator,
    save_generators,
)


def test_paper_parameter_counts() -> None:
    assert count_parameters(ResnetGenerator()) == 11_378_179
    assert count_parameters(PatchDiscriminator()) == 2_764_737


def test_shapes_any_multiple_of_four() -> None:
    g = ResnetGenerator(ngf=8, n_blocks=2)
    d = PatchDiscriminator(ndf=8)
    x = torch.randn(2, 3, 36, 44)
    y = g(x)
    assert y.shape == x.shape and y.abs().max() <= 1.0
    # 70x70 PatchGAN on 256 gives a 30x30 map of patch logits.
    assert d(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)


def test_init_is_reference_normal() -> None:
    g = ResnetGenerator(ngf=16, n_blocks=3)
    init_weights(g, generator=torch.Generator().manual_seed(0))
    convs = [m for m in g.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    w = torch.cat([m.weight.flatten() for m in convs])
    assert abs(w.mean().item()) < 2e-3 and w.std().item() == pytest.approx(0.02, rel=0.05)
    assert all(torch.count_nonzero(m.bias) == 0 for m in convs)


def test_model_folder_roundtrip(tmp_path) -> None:
    spec = GeneratorSpec(ngf=8, n_blocks=2)
    ga, gb = spec.build(), spec.build()
    init_weights(ga)
    init_weights(gb)
    save_generators(tmp_path, ga, gb, spec, extra={"run_id": "abc"})
    x = torch.randn(1, 3, 16, 16)
    for direction, net in (("A2B", ga), ("B2A", gb)):
        loaded = load_generator(tmp_path, direction)
        torch.testing.assert_close(loaded(x), net.eval()(x))
    assert not list(tmp_path.glob("*.tmp"))
