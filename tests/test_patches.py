"""patchify / unpatchify, the conv <-> linear weight conversions, and PatchEmbed's two forms."""

import pytest
import torch
from torch.testing import assert_close

from vitlab.model.patches import PatchEmbed, conv_to_linear_weight, linear_to_conv_weight, patchify, unpatchify


def test_patchify_shape():
    images = torch.randn(2, 3, 12, 8)
    assert patchify(images, 4).shape == (2, 3 * 2, 4 * 4 * 3)


def test_patchify_order_is_row_major_patches_and_p1_p2_c_inside_a_patch():
    torch.manual_seed(0)
    P, C = 3, 2
    images = torch.randn(1, C, 6, 9)  # a 2 x 3 grid of patches
    patches = patchify(images, P)
    row, col = 1, 2
    n = row * 3 + col  # row-major: patch (1, 2) is the 6th
    block = images[0, :, row * P:(row + 1) * P, col * P:(col + 1) * P]  # (C, P, P)
    by_hand = torch.tensor([block[c, p1, p2].item() for p1 in range(P) for p2 in range(P) for c in range(C)])
    assert torch.equal(patches[0, n], by_hand)


def test_patchify_first_entries_by_hand():
    # channel varies fastest inside a patch: (p1 p2 c)
    images = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    first = patchify(images, 2)[0, 0]
    assert first.tolist() == [0.0, 16.0, 1.0, 17.0, 4.0, 20.0, 5.0, 21.0]


@pytest.mark.parametrize(("shape", "grid"), [((2, 3, 8, 8), None), ((2, 1, 6, 10), (3, 5)), ((1, 2, 10, 4), (5, 2))])
def test_unpatchify_inverts_patchify(shape, grid):
    images = torch.randn(shape)
    patches = patchify(images, 2)
    assert torch.equal(unpatchify(patches, 2, shape[1], grid=grid), images)
    assert torch.equal(patchify(unpatchify(patches, 2, shape[1], grid=grid), 2), patches)


def test_unpatchify_needs_the_grid_when_it_is_not_square():
    patches = patchify(torch.randn(1, 1, 6, 10), 2)  # 15 patches, 3 x 5
    with pytest.raises(ValueError, match=r"15 patches do not form a square grid; pass grid=\(rows, columns\)"):
        unpatchify(patches, 2, 1)
    assert unpatchify(patches, 2, 1, grid=(5, 3)).shape == (1, 1, 10, 6)


def test_unpatchify_errors_name_expected_and_received():
    with pytest.raises(ValueError, match=r"P\*P\*C = 2\*2\*3 = 12; got 8"):
        unpatchify(torch.randn(1, 4, 8), 2, 3)
    with pytest.raises(ValueError, match=r"grid \(2, 3\) holds 6 patches; got 4"):
        unpatchify(torch.randn(1, 4, 4), 2, 1, grid=(2, 3))
    with pytest.raises(ValueError, match=r"\(B, N, P\*P\*C\); got a tensor of shape \(4, 4\)"):
        unpatchify(torch.randn(4, 4), 2, 1)


def test_patchify_errors_name_expected_and_received():
    with pytest.raises(ValueError, match=r"divisible by patch_size=4; got 10x8"):
        patchify(torch.randn(1, 1, 10, 8), 4)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\); got a tensor of shape \(8, 8\)"):
        patchify(torch.randn(8, 8), 4)


def test_conv_linear_weight_conversions_are_inverse():
    w_conv = torch.randn(5, 3, 4, 4)
    w_lin = conv_to_linear_weight(w_conv)
    assert w_lin.shape == (5, 48)
    assert torch.equal(linear_to_conv_weight(w_lin, 4, 3), w_conv)
    w_lin = torch.randn(5, 48)
    assert torch.equal(conv_to_linear_weight(linear_to_conv_weight(w_lin, 4, 3)), w_lin)


def test_conv_to_linear_weight_acts_on_patchify_output():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 8, 8)
    w, b = torch.randn(5, 3, 4, 4), torch.randn(5)
    conv = torch.nn.functional.conv2d(images, w, b, stride=4).flatten(2).transpose(1, 2)  # (B, N, D)
    linear = patchify(images, 4) @ conv_to_linear_weight(w).T + b
    assert_close(linear, conv)


@pytest.mark.parametrize(("src", "dst"), [("conv", "linear"), ("linear", "conv")])
def test_patch_embed_forms_agree_after_load_from(src, dst):
    torch.manual_seed(0)
    a, b = PatchEmbed(4, 3, 6, kind=src), PatchEmbed(4, 3, 6, kind=dst)
    images = torch.randn(2, 3, 8, 12)
    assert not torch.allclose(a(images), b(images))  # independent initialisations differ
    assert b.load_from(a) is b
    out = b(images)
    assert out.shape == (2, 6, 6)
    assert_close(out, a(images))
    assert torch.equal(b.linear_weight(), a.linear_weight())


def test_linear_form_taps_the_flattened_patches():
    pe = PatchEmbed(4, 3, 6, kind="linear")
    seen = []
    pe.patches.register_forward_hook(lambda m, args, out: seen.append(out))
    images = torch.randn(1, 3, 8, 8)
    pe(images)
    assert torch.equal(seen[0], patchify(images, 4))


def test_load_from_rejects_other_patch_geometry():
    with pytest.raises(ValueError, match=r"patch_size=4, in_channels=3; got patch_size=2, in_channels=3"):
        PatchEmbed(4, 3, 6).load_from(PatchEmbed(2, 3, 6))


def test_unknown_kind():
    with pytest.raises(ValueError, match=r"'conv' or 'linear'; got 'mlp'"):
        PatchEmbed(4, 3, 6, kind="mlp")


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_both_forms_reject_images_not_divisible_by_the_patch(kind):
    # A stride-P conv would silently drop the border pixels; both forms must refuse instead.
    with pytest.raises(ValueError, match=r"divisible by patch_size=4; got 10x8"):
        PatchEmbed(4, 3, 6, kind=kind)(torch.randn(1, 3, 10, 8))
