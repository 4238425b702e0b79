"""The look shared by every picture: the input type, colour map, colours, opacity and patch gids."""

from __future__ import annotations

import numpy as np
import torch

ImageLike = torch.Tensor | np.ndarray

_HEATMAP_CMAP = "magma"
_BOX_COLOR = "#00e5ff"
_BOX_GID = "rf-box"  # the Rectangle outlining the field on the input grid
_CELL_GID = "rf-cell"  # the Rectangle outlining the chosen cell on the output grid
_OVERLAY_ALPHA = 0.6  # opacity of the heatmap drawn over an image
_EXTENT_COLOR = "#7CFC00"
_EXTENT_GID = "erf-extent"  # the Rectangle outlining the effective field's mass-q extent
_TARGET_COLOR = "#ffffff"
_TARGET_GID = "erf-target"  # the Rectangle of the target object size, centred on the field
