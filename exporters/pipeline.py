"""Deprecated alias of `fedclip_edge.exporters.export`.

Moved in 0.2 by the layout redesign; removed in 0.3.

Imported by name at run time rather than by an import statement, so the alias adds no edge to
the package's import graph (the core does not depend on the server side).
"""

import importlib
import sys
import warnings

warnings.warn(
    "fedclip_edge.exporters.pipeline moved to fedclip_edge.exporters.export; "
    "the old name is removed in 0.3",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = importlib.import_module("fedclip_edge.exporters.export")
