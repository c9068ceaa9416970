"""Loss-landscape slices: 1-D lines and 2-D planes (random filter-normalized or PCA), evaluated in
batches and stored in the run (see :mod:`trajscope.landscape.slices`)."""

from trajscope.landscape.directions import filter_normalize, plane_coordinates, random_direction
from trajscope.landscape.grid import evaluate_points, evaluate_points_reference, grid_coefficients
from trajscope.landscape.slices import landscape, line_slice

__all__ = ["evaluate_points", "evaluate_points_reference", "filter_normalize", "grid_coefficients",
           "landscape", "line_slice", "plane_coordinates", "random_direction"]
