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


def _reference_generator_layout(ngf: int = 64, n_blocks: int = 9) -> list[tuple[str, tuple]]:
    """The reference's ResnetGenerator state_dict (keys and shapes, in order), written out
    from its layer list: pad, conv7, norm, relu | 2 x (conv3 s2, norm, relu) | blocks |
    2 x (convT3 s2, norm, relu) | pad, conv7, tanh. Blocks: pad, conv, norm, relu, pad,
    conv, norm (no dropout in CycleGAN). ConvTranspose2d weights are (in, out, k, k)."""
    out: list[tuple[str, tuple]] = []

    def conv(i: int | str, cin: int, cout: int, k: int, transpose: bool = False) -> None:
        w = (cin, cout, k, k) if transpose else (cout, cin, k, k)
        out.extend([(f"model.{i}.weight", w), (f"model.{i}.bias", (cout,))])

    conv(1, 3, ngf, 7)
    conv(4, ngf, 2 * ngf, 3)
    conv(7, 2 * ngf, 4 * ngf, 3)
    for b in range(n_blocks):
        conv(f"{10 + b}.conv_block.1", 4 * ngf, 4 * ngf, 3)
        conv(f"{10 + b}.conv_block.5", 4 * ngf, 4 * ngf, 3)
    i = 10 + n_blocks
    conv(i, 4 * ngf, 2 * ngf, 3, transpose=True)
    conv(i + 3, 2 * ngf, ngf, 3, transpose=True)
    conv(i + 7, ngf, 3, 7)
    return out


def _reference_discriminator_layout(ndf: int = 64) -> list[tuple[str, tuple]]:
    """70x70 PatchGAN: conv(s2, no norm), lrelu | 2 x (conv s2, norm, lrelu) |
    conv s1, norm, lrelu | conv s1 -> 1; kernel 4 throughout."""
    chans = [(3, ndf, 0), (ndf, 2 * ndf, 2), (2 * ndf, 4 * ndf, 5), (4 * ndf, 8 * ndf, 8)]
    out = []
    for cin, cout, i in [*chans, (8 * ndf, 1, 11)]:
        out += [(f"model.{i}.weight", (cout, cin, 4, 4)), (f"model.{i}.bias", (cout,))]
    return out


@pytest.mark.parametrize(
    ("net", "layout"),
    [
        (lambda: ResnetGenerator(), _reference_generator_layout()),
        (lambda: ResnetGenerator(ngf=32, n_blocks=6), _reference_generator_layout(32, 6)),
        (lambda: PatchDiscriminator(), _reference_discriminator_layout()),
    ],
)
def test_reference_state_dict_maps_position_by_position(net, layout) -> None:
    ours = net()
    mine = [(k, tuple(v.shape)) for k, v in ours.state_dict().items()]
    assert [s for _, s in mine] == [s for _, s in layout]  # position by position
    assert [k for k, _ in mine] == [k for k, _ in layout]  # and even the same names
    # So a reference checkpoint loads as it is.
    gen = torch.Generator().manual_seed(0)
    ref = {k: torch.randn(s, generator=gen) for k, s in layout}
    ours.load_state_dict(ref, strict=True)
    assert torch.equal(ours.state_dict()[layout[-2][0]], ref[layout[-2][0]])
