"""crl: contrastive representation learning defenses for chat LLMs.

The method is that of Simko et al., "Improving Large Language Model Safety with Contrastive
Representation Learning" (arXiv 2506.11938). Submodules are imported lazily so that `import crl`
stays cheap (torch and transformers load only when training or evaluation needs them).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("crl")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

__all__ = ["__version__"]
