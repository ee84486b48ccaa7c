"""Vision-language model backends behind one interface (``stages.vlm.base.VlmBackend``).

Backend modules import their heavy libraries (torch, transformers, vllm, httpx) only when
chosen, so importing this package is cheap.
"""

from stages.vlm.base import Prompt, VlmBackend, VlmImage, VlmOutputError, make_backend, yes_probability

__all__ = ["Prompt", "VlmBackend", "VlmImage", "VlmOutputError", "make_backend", "yes_probability"]
