"""Gene-expression encoders. Importing this package registers every built-in gene encoder family."""

from . import (
    drvi,  # noqa: F401
    mlp,  # noqa: F401  (MLP trained from scratch)
    nicheformer,  # noqa: F401
    scfoundation,  # noqa: F401
)
