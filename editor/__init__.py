"""pivot-edit: real-image editing with Stable Diffusion (null-text inversion + Prompt-to-Prompt).

The one entry point is :class:`Editor`; options are one dataclass per verb::

    from editor import Editor, EditOptions, InvertOptions
    ed = Editor.from_pretrained("shapes")
    inv = ed.invert("photo.png", "a red circle on a white background", InvertOptions(steps=50))
    res = ed.edit(inv, "a blue circle on a white background", EditOptions(cross_replace=0.8))
"""

from .editing import EditResult
from .facade import Editor
from .inversion import Inversion
from .options import EditOptions, GenerateOptions, InvertOptions
from .progress import Cancelled

__all__ = ["Editor", "Inversion", "EditResult", "EditOptions", "GenerateOptions",
           "InvertOptions", "Cancelled"]
