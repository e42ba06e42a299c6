"""favor: FAVOR+ (Performer) attention for PyTorch, linear in sequence length."""

from .attention import favor_attention, favor_attention_step
from .feature_maps import (
    FEATURES,
    KERNELS,
    KEY_ESTIMATORS,
    feature_map,
    key_feature_map,
    num_features,
    oprf_parameter,
    random_features,
)
from .linear import DEFAULT_CHUNK_SIZE, FavorState, causal_linear_attention, linear_attention
from .projections import (
    PROJECTIONS,
    SCALINGS,
    HadamardProjection,
    gaussian_iid_matrix,
    gaussian_orthogonal_matrix,
    givens_orthogonal_matrix,
    hadamard_orthogonal_matrix,
    hadamard_projection,
    hadamard_transform,
    projection_matrix,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FEATURES",
    "KERNELS",
    "KEY_ESTIMATORS",
    "PROJECTIONS",
    "SCALINGS",
    "FavorState",
    "HadamardProjection",
    "causal_linear_attention",
    "favor_attention",
    "favor_attention_step",
    "feature_map",
    "gaussian_iid_matrix",
    "gaussian_orthogonal_matrix",
    "givens_orthogonal_matrix",
    "hadamard_orthogonal_matrix",
    "hadamard_projection",
    "hadamard_transform",
    "key_feature_map",
    "linear_attention",
    "num_features",
    "oprf_parameter",
    "projection_matrix",
    "random_features",
]


def __getattr__(name: str):
    # favor.performerize / favor.unperformerize live in the optional transformers adapter, which
    # imports transformers: resolve them on first use, never at `import favor`.
    if name in ("performerize", "unperformerize"):
        from .integrations import transformers as _hf

        return getattr(_hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
