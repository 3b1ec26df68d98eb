"""DyCE Serve's online half: a FastAPI server over the core's early-exit executor.

``create_app`` is imported lazily so that ``dyce-serve`` can refuse bad settings before it
pays for importing torch.
"""

from typing import Any

from .settings import Settings

__all__ = ["Settings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .edge.app import create_app

        return create_app
    raise AttributeError(name)
