"""pivot-edit: real-image editing with Stable Diffusion (null-text inversion + Prompt-to-Prompt).

The one entry point is :class:`Editor`::

    from editor import Editor
    ed = Editor.from_pretrained("shapes")
    img = ed.generate("a red circle on a white background", seed=0)
"""

from .inversion import Inversion
from .model import Editor

__all__ = ["Editor", "Inversion"]
