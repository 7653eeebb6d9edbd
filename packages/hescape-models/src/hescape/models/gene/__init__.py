"""Gene-expression encoders. Importing this package registers every built-in gene encoder family."""

from . import mlp  # noqa: F401  (MLP trained from scratch)
from . import nicheformer  # noqa: F401
from . import scfoundation  # noqa: F401
from . import drvi  # noqa: F401
