"""zolite: zeroth-order fine-tuning of one dominant decoder layer, with tiny hot-swappable patches."""
from .version import __version__

from .errors import ZoliteError  # noqa: E402
from .loading import load_model  # noqa: E402
from .patch import load_patch, save_patch  # noqa: E402
from .apply import apply_patch  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .predict import classify_file, generate  # noqa: E402
from .tune import tune  # noqa: E402
from .profiling import profile_memory  # noqa: E402
from .ablate import ablate  # noqa: E402
from .swap import PatchSet, load_with_patches  # noqa: E402
from .export import export  # noqa: E402
from .serve import serve  # noqa: E402

__all__ = ["ZoliteError", "load_model", "apply_patch", "load_patch", "save_patch", "evaluate", "tune", "generate",
           "classify_file", "profile_memory", "ablate", "PatchSet", "load_with_patches", "export", "serve",
           "__version__"]
