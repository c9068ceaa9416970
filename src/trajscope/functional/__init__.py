"""Functional building blocks: the trajectory sketch (a count-sketch random projection)."""

from trajscope.functional.sketch import (
    Sketcher,
    cosine_error_bound,
    inner_error_bound,
    norm_error_bound,
    sketch_cosine,
    sketch_cosine_matrix,
    sketch_distance,
    sketch_gram,
    sketch_indices,
    sketch_inner,
    sketch_norm,
)

__all__ = [
    "Sketcher",
    "cosine_error_bound",
    "inner_error_bound",
    "norm_error_bound",
    "sketch_cosine",
    "sketch_cosine_matrix",
    "sketch_distance",
    "sketch_gram",
    "sketch_indices",
    "sketch_inner",
    "sketch_norm",
]
