"""Pictures as RGB arrays for loggers' image panels: a coloured, enlarged heatmap, and a rendered figure."""

from __future__ import annotations

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rf_callback.plotting.style import _HEATMAP_CMAP

__all__ = ["figure_to_array", "heatmap_image"]

_HEATMAP_MIN_SIDE = 256  # heatmap images are upscaled (nearest) until their longer side reaches this
_STRIP_HEIGHT = 24  # rows of a 1D heatmap's strip
# Where every non-zero pixel belongs to the field (an exact one), the least step of the colour map it is drawn at:
# the far tail of a deep field (1e-18 of the peak) is drawn dark, never as the background.
_SUPPORT_FLOOR = 0.15


def heatmap_image(
    heatmap: torch.Tensor, *, depth: int | None = None, min_side: int = _HEATMAP_MIN_SIDE, support: bool = False
) -> np.ndarray:
    """Colours a heatmap with the figures' colour map and enlarges it, for loggers' image panels.

    The heatmap is normalised to its maximum and coloured with the colour map of :func:`plot_rf`; each input pixel
    becomes a square block of pixels (nearest neighbour, never interpolated) so that the longer side reaches
    ``min_side`` or just under it (whole multiples only; never shrunk): a 5 x 5 field on a 48 x 48 input is 25 x 25
    screen pixels. A 1D heatmap becomes a strip ``_STRIP_HEIGHT`` rows high; a 3D one is shown at depth ``depth``
    (default: the depth slice holding the most mass, which lies inside the field). With ``support`` (an exact
    field's heatmap: theoretical or weights mode), every non-zero pixel is drawn at least at a visible step of the
    colour map, so the whole field shows however faint its border (a 20-layer stack's corners are 1e-18 of the
    peak); an effective field's heatmap is drawn by its mass alone.

    Args:
        heatmap: a 1D, 2D or 3D heatmap (a field's ``heatmap``).
        depth: for a 3D heatmap, the depth index to show.
        min_side: the longer side, in pixels, the image is enlarged towards.
        support: draw every non-zero pixel visibly apart from the background (see above).

    Returns:
        A ``uint8`` RGB array ``(height, width, 3)``.
    """
    # In float64 until normalised: a deep field redone in float64 holds values below float32's range (1e-48),
    # which a cast first turned to 0 (drawn as background) or, above it, to inf (the whole field black).
    values = heatmap.detach().to("cpu", torch.float64)
    strip = values.dim() == 1
    if values.dim() == 3:
        values = values[int(values.abs().sum(dim=(1, 2)).argmax()) if depth is None else depth]
    peak = values.max()
    pixels = (values / peak if peak > 0 else values).numpy()
    if support:
        pixels = np.where(pixels > 0, np.maximum(pixels, _SUPPORT_FLOOR), pixels)
    pixels = pixels.astype(np.float32)
    if strip:
        pixels = pixels[None, :]
    scale = max(1, min_side // max(pixels.shape))
    pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    if strip:  # as high as the doc says whatever the length (a whole multiple of the scale was 25 to 46 rows)
        pixels = pixels[:1].repeat(_STRIP_HEIGHT, axis=0)
    colours = matplotlib.colormaps[_HEATMAP_CMAP](pixels)[..., :3]
    return (colours * 255).round().astype(np.uint8)


def figure_to_array(fig: Figure, dpi: int = 80) -> np.ndarray:
    """Renders a figure to an RGB image.

    Args:
        fig: a figure from :func:`plot_rf` (or any Agg-drawable figure).
        dpi: resolution of the rendering.

    Returns:
        A ``uint8`` array ``(height, width, 3)``.
    """
    fig.set_dpi(dpi)
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
