"""Draw your own digit: a canvas drawing -> the 28 x 28 input an MNIST model expects, and a pad to draw on.

MNIST's digits were prepared in two steps (LeCun et al., the MNIST page): each digit's bounding box was
scaled to fit a 20 x 20 box, keeping its aspect ratio (anti-aliased, so edges are grey), and the result
was placed in a 28 x 28 image so that its centre of mass sits at the centre. ``to_mnist`` does the same
to a drawing, so that a digit drawn small in a corner reaches the model as large and centred as the
digits it was trained on.

    digit = to_mnist(pixels)       # (H, W) or (H, W, 3|4) drawing -> (28, 28) uint8, ink 255 on 0
    pad = DrawingPad(model)        # an ipycanvas canvas, a clear button, the input, the prediction
    display(pad)

Legend: H/W height/width of the drawing.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F

MNIST_SIZE = 28  # side of an MNIST image
MNIST_BOX = 20  # side of the box each digit's bounding box is scaled to fit
INK_THRESHOLD = 0.1  # a pixel with at least this much ink (of the darkest) belongs to the digit's bounding box


class EmptyDrawingError(ValueError):
    """The drawing has no ink: there is no digit to centre or to classify."""


def ink(pixels) -> np.ndarray:
    """(H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA -> (H, W) float in [0, 1], 1 where the stroke is.

    Grey and RGB drawings are light strokes on a dark ground, as MNIST stores them (255 is ink); for
    RGBA, as a canvas returns its pixels, the ink is the alpha channel whatever the stroke's colour.
    """
    array = np.asarray(pixels)
    if array.ndim == 3 and array.shape[-1] == 4:
        grey = array[..., 3]
    elif array.ndim == 3 and array.shape[-1] == 3:
        grey = array.mean(axis=-1)
    elif array.ndim == 2:
        grey = array
    else:
        raise ValueError(f"expected a drawing of shape (H, W), (H, W, 3) or (H, W, 4); got {array.shape}")
    grey = grey.astype(np.float64)
    scale = 255.0 if np.issubdtype(array.dtype, np.integer) or grey.max() > 1 else 1.0
    return np.clip(grey / scale, 0.0, 1.0)


def to_mnist(pixels) -> torch.Tensor:
    """(H, W) or (H, W, 3|4) drawing -> (28, 28) uint8, ink 255 on 0, centred and scaled as MNIST's digits are.

    1. the bounding box of the ink (pixels with at least INK_THRESHOLD of the strongest ink) is cut out;
    2. it is resized, anti-aliased and keeping its aspect ratio, so that its longer side is MNIST_BOX = 20;
    3. it is placed in a 28 x 28 image so that its centre of mass (the ink-weighted mean pixel position)
       falls on the image centre, (13.5, 13.5) in pixel coordinates, to the nearest pixel.

    Raises ``EmptyDrawingError`` (a ValueError) when there is no ink: no digit, so no prediction.
    """
    amount = ink(pixels)
    if amount.max() <= 0:
        raise EmptyDrawingError("the drawing is empty: draw a digit first (expected some ink, got none)")
    rows, cols = np.nonzero(amount >= INK_THRESHOLD * amount.max())
    box = amount[rows.min():rows.max() + 1, cols.min():cols.max() + 1]  # (h, w)
    h, w = box.shape
    scale = MNIST_BOX / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))  # the longer side becomes exactly 20
    resized = F.interpolate(torch.from_numpy(box)[None, None].float(), size=size, mode="bilinear",
                            antialias=True, align_corners=False)[0, 0].clamp(0, 1).numpy()
    weights = resized / resized.sum()
    com_y = float((weights.sum(axis=1) * np.arange(size[0])).sum())  # centre of mass in the resized box
    com_x = float((weights.sum(axis=0) * np.arange(size[1])).sum())
    centre = (MNIST_SIZE - 1) / 2  # 13.5: the centre of a 28-pixel row
    top, left = round(centre - com_y), round(centre - com_x)
    top = min(max(top, 0), MNIST_SIZE - size[0])  # a lopsided digit still fits entirely
    left = min(max(left, 0), MNIST_SIZE - size[1])
    digit = np.zeros((MNIST_SIZE, MNIST_SIZE))
    digit[top:top + size[0], left:left + size[1]] = resized
    return torch.from_numpy(np.round(digit * 255).astype(np.uint8))


def render_strokes(strokes: list[list[tuple[float, float]]], size: int = 280, width: float = 20.0) -> np.ndarray:
    """Strokes (lists of (x, y) canvas points) -> (size, size) uint8, ink 255 on 0: each stroke as a round line."""
    from PIL import Image, ImageDraw

    picture = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(picture)
    radius = width / 2
    for stroke in strokes:
        points = [(float(x), float(y)) for x, y in stroke]
        if len(points) > 1:
            draw.line(points, fill=255, width=max(1, round(width)), joint="curve")
        for x, y in points:  # round ends and joints
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    return np.asarray(picture)


class DrawingPad:
    """Draw a digit with the mouse; on release, see the 28 x 28 input, the prediction and where the model attends.

    ``pad.widget`` (display it) holds an ipycanvas canvas of ``size`` pixels (white strokes on black, as
    MNIST stores digits), a "Clear" button, the 28 x 28 input the model gets (``to_mnist``), the
    predicted digit, and the attention views of an ``AttentionExplorer`` for the drawing: ``view`` and
    ``layer`` as in the explorer, all heads on a shared scale. The strokes are kept in Python
    (``strokes``), so the input is rendered from them and not read back from the browser.
    """

    def __init__(self, model, size: int = 280, width: float = 20.0, view: str = "cls", layer: int | None = None):
        import ipywidgets as widgets
        from ipycanvas import Canvas

        self.model = model
        self.size = size
        self.width = width
        self.strokes: list[list[tuple[float, float]]] = []
        self.digit: torch.Tensor | None = None  # the last (28, 28) input
        self.prediction: int | None = None
        self.explorer = None  # an AttentionExplorer of the last drawing
        self._drawing = False
        self.canvas = Canvas(width=size, height=size, layout=widgets.Layout(width=f"{size}px", height=f"{size}px"))
        self.clear_button = widgets.Button(description="Clear", icon="eraser")
        self.result = widgets.Label("Draw a digit, then let go of the mouse button.")
        self.input_image = widgets.Image(format="png", layout=widgets.Layout(width="112px", height="112px"))
        self.views = widgets.Image(format="png")
        self.view = widgets.ToggleButtons(options=[("CLS \u2192 patches", "cls"), ("rollout", "rollout")], value=view,
                                          style={"button_width": "auto"})
        depth = model.config.depth
        self.layer = widgets.IntSlider(value=depth - 1 if layer is None else layer, min=0, max=depth - 1,
                                       description="layer", continuous_update=False)
        for name in ("canvas", "clear_button", "result", "input_image", "views", "view", "layer"):
            getattr(self, name).add_class(f"vitlab-draw-{name.replace('_', '-')}")
        self.canvas.on_mouse_down(self._down)
        self.canvas.on_mouse_move(self._move)
        self.canvas.on_mouse_up(self._up)
        self.canvas.on_mouse_out(self._up)
        self.clear_button.on_click(self.clear)
        self.view.observe(self._show_views, "value")
        self.layer.observe(self._show_views, "value")
        self._blank()
        self.widget = widgets.VBox([
            widgets.HBox([self.canvas, widgets.VBox([self.clear_button, self.input_image, self.result])]),
            widgets.HBox([self.view, self.layer]),
            self.views,
        ])
        self.widget.add_class("vitlab-draw")

    def _blank(self) -> None:
        self.canvas.fill_style = "black"
        self.canvas.fill_rect(0, 0, self.size, self.size)
        self.canvas.stroke_style = "white"
        self.canvas.fill_style = "white"
        self.canvas.line_width = self.width
        self.canvas.line_cap = "round"
        self.canvas.line_join = "round"

    def _down(self, x: float, y: float) -> None:
        self._drawing = True
        self.strokes.append([(x, y)])
        self.canvas.fill_circle(x, y, self.width / 2)

    def _move(self, x: float, y: float) -> None:
        if not self._drawing:
            return
        (x0, y0) = self.strokes[-1][-1]
        self.strokes[-1].append((x, y))
        self.canvas.stroke_line(x0, y0, x, y)

    def _up(self, x: float, y: float) -> None:
        if not self._drawing:
            return
        self._drawing = False
        self.update()

    def update(self) -> None:
        """Render the strokes, make the 28 x 28 input, predict, and show the input, the prediction and the views."""
        from PIL import Image as PILImage

        from ..training.data import normalize_batch
        from .explorer import AttentionExplorer

        try:
            digit = to_mnist(render_strokes(self.strokes, self.size, self.width))
        except EmptyDrawingError as err:
            self.result.value = str(err)
            return
        self.digit = digit
        self.explorer = AttentionExplorer(self.model, normalize_batch(digit[None]))
        probs = self.explorer.recorded(0).probs
        self.prediction = int(probs.argmax())
        self.result.value = f"prediction: {self.prediction} ({float(probs[self.prediction]):.0%})"
        buffer = io.BytesIO()
        PILImage.fromarray(digit.numpy()).resize((112, 112), PILImage.NEAREST).save(buffer, format="png")
        self.input_image.value = buffer.getvalue()
        self._show_views()

    def _show_views(self, change=None) -> None:
        from .explorer import png_bytes, render_view

        if self.explorer is None:
            return
        view, layer = self.view.value, self.layer.value
        self.layer.disabled = view == "rollout"
        maps = self.explorer.maps(0, view=view, layer=layer, head="all")
        titles = ["rollout, mean over heads"] if view == "rollout" else \
            [f"layer {layer}, head {k}" for k in range(len(maps))]
        self.views.value = png_bytes(render_view(self.explorer.picture(0), maps, view, titles, "shared"))

    def clear(self, button=None) -> None:
        """Forget the strokes and blank the canvas, the input and the prediction."""
        self.strokes = []
        self._drawing = False
        self.digit = self.prediction = self.explorer = None
        self.canvas.clear()
        self._blank()
        self.input_image.value = b""
        self.views.value = b""
        self.result.value = "Draw a digit, then let go of the mouse button."
