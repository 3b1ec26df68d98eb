"""DyCE Serve's online half: a FastAPI server over the core's early-exit executor."""

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]
