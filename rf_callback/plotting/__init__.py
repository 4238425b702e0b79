"""Pictures of receptive fields with matplotlib (no Lightning): figures, heatmap images and animations."""

from rf_callback.plotting.animation import animate_rf
from rf_callback.plotting.figures import plot_effective, plot_growth, plot_rf
from rf_callback.plotting.images import figure_to_array, heatmap_image

__all__ = ["animate_rf", "figure_to_array", "heatmap_image", "plot_effective", "plot_growth", "plot_rf"]
