"""Small trained checkpoints shipped inside the package (see README.md in this folder).

``shipped_path(name)`` -> the file of a shipped checkpoint, or None when it is not shipped
(e.g. the WaveNet one before it is trained). ``fastar sample NAME`` and ``fastar demo``
accept these names where a checkpoint path is expected.
"""
from __future__ import annotations

import os

__all__ = ["SHIPPED", "shipped_path"]

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = {
    "gated_pixelcnn_mnist": "gated_pixelcnn_mnist.pt",
    "wavenet_speech": "wavenet_speech.pt",
}


def shipped_path(name: str) -> str | None:
    f = SHIPPED.get(name)
    if f is None:
        return None
    p = os.path.join(HERE, f)
    return p if os.path.exists(p) else None
