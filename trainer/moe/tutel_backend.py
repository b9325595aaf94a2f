"""The Tutel backend (placeholder while the adapter is written)."""

from __future__ import annotations

import importlib.util

from trainer.config import TUTEL_ROUTERS, MoEConfig


def available() -> bool:
    """Whether tutel can be imported here (it is not on PyPI; users build it themselves)."""
    return importlib.util.find_spec("tutel") is not None


def supports(cfg: MoEConfig) -> bool:
    """Whether Tutel's layer can compute what ``cfg`` asks for."""
    return cfg.router in TUTEL_ROUTERS and cfg.routing == "token"
