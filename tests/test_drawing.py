"""Canvas drawing -> the 28 x 28 input: scaled into a 20 x 20 box and centred by centre of mass, as MNIST's digits are."""

import numpy as np
import pytest
import torch

import vitlab
from vitlab.lab.drawing import MNIST_BOX, DrawingPad, EmptyDrawingError, ink, render_strokes, to_mnist


def centre_of_mass(digit: torch.Tensor) -> tuple[float, float]:
    weights = digit.double() / digit.double().sum()
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    return float((weights * rows).sum()), float((weights * cols).sum())


def bounding_box(digit: torch.Tensor) -> tuple[int, int]:
    rows, cols = torch.nonzero(digit > 0.1 * digit.max(), as_tuple=True)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def test_a_centred_stroke_gives_a_centred_digit_of_mnist_size():
    stroke = [[(140, 60), (140, 220)]]  # a vertical bar in the middle of a 280 x 280 canvas: a "1"
    digit = to_mnist(render_strokes(stroke, size=280, width=20))
    assert digit.shape == (28, 28) and digit.dtype == torch.uint8 and int(digit.max()) >= 250
    height, width = bounding_box(digit)
    assert height == MNIST_BOX and width < height  # the longer side fills the 20-pixel box, the aspect kept
    row, col = centre_of_mass(digit)
    assert abs(row - 13.5) <= 0.75 and abs(col - 13.5) <= 0.75


def test_a_small_digit_in_a_corner_comes_out_like_the_same_digit_drawn_big_in_the_middle():
    big = [[(80, 80), (200, 80), (200, 200), (80, 200), (80, 80)]]  # a square "0", 120 px
    small = [[(x / 4 + 10, y / 4 + 10) for x, y in big[0]]]  # a quarter the size, top left
    a = to_mnist(render_strokes(big, width=20)).float() / 255
    b = to_mnist(render_strokes(small, width=5)).float() / 255
    assert (a - b).abs().mean() < 0.06
    assert bounding_box(b)[0] == MNIST_BOX
    row, col = centre_of_mass(b)
    assert abs(row - 13.5) <= 0.75 and abs(col - 13.5) <= 0.75


def test_a_lopsided_digit_is_centred_by_mass_not_by_box():
    picture = np.zeros((100, 100), dtype=np.uint8)
    picture[10:90, 10:20] = 255  # a heavy bar on the left
    picture[10:12, 20:60] = 255  # a thin line to the right
    digit = to_mnist(picture)
    _, col = centre_of_mass(digit)
    assert abs(col - 13.5) <= 0.75  # the mass is centred
    cols = torch.nonzero(digit.sum(0)).flatten()
    assert 13.5 - cols.min() < cols.max() - 13.5 - 2  # so the box is not: more of it lies right of the centre


def test_an_empty_canvas_gives_a_clear_error_not_a_prediction():
    with pytest.raises(EmptyDrawingError, match="empty: draw a digit first"):
        to_mnist(np.zeros((280, 280, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="empty"):
        to_mnist(render_strokes([], size=64))


def test_ink_reads_alpha_grey_and_rgb_and_names_a_bad_shape():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[1, 2] = (0, 0, 0, 255)  # a black stroke on a transparent canvas is ink
    assert ink(rgba)[1, 2] == 1.0 and ink(rgba).sum() == 1.0
    assert ink(np.full((2, 2, 3), 255, dtype=np.uint8)).min() == 1.0
    with pytest.raises(ValueError, match=r"expected a drawing of shape .* got \(2, 2, 2\)"):
        ink(np.zeros((2, 2, 2)))


def test_drawing_pad_predicts_on_release_and_clears():
    torch.manual_seed(0)
    model = vitlab.ViT().eval()
    pad = DrawingPad(model)
    pad._up(0, 0)  # a release without a stroke changes nothing
    assert pad.prediction is None
    pad._down(140, 60)
    for y in range(70, 230, 10):
        pad._move(140, y)
    pad._up(140, 220)
    assert pad.digit is not None and pad.digit.shape == (28, 28)
    assert pad.prediction in range(10) and pad.result.value.startswith(f"prediction: {pad.prediction}")
    assert bytes(pad.input_image.value).startswith(b"\x89PNG") and bytes(pad.views.value).startswith(b"\x89PNG")
    torch.testing.assert_close(pad.digit, to_mnist(render_strokes(pad.strokes)))
    pad.clear()
    assert pad.strokes == [] and pad.prediction is None and bytes(pad.input_image.value) == b""
    pad.update()  # nothing drawn: a message, not a prediction
    assert "empty" in pad.result.value and pad.prediction is None
