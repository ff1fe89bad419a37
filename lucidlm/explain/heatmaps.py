"""The rendering helpers moved to :mod:`lucidlm.render` (``cells``: colours and tokens,
``terminal``, ``html``, ``png``). This module keeps the old import path,
``from lucidlm.explain import heatmaps as hm``, working for code outside lucidlm; new code imports
:mod:`lucidlm.render` directly.

>>> rgb(2.0, 1.0)
(255, 0, 0)
"""

from ..render.cells import (EVICTED, EVICTED_NOTE, EVICTED_TEXT, FUTURE, LEGEND, MATRIX_LEGEND, NEGATIVE,
                            NEUTRAL, POSITIVE, RGB, SINK_NOTE, Cell, cell_notes, color_scale, colormap,
                            display_width, hex_color, layout, rgb, rgb_array, text_rgb, token_cells, visible)
from ..render.html import CSS, esc, html_cell, html_cells, html_document, html_legend, png_data_uri
from ..render.html import script_json as html_json
from ..render.png import DPI, add_colorbar, figure_png, image_figure, matrix_figure, new_figure, text_size, \
    tokens_figure
from ..render.terminal import RESET, ansi, terminal_cell, terminal_legend, terminal_text

__all__ = ["CSS", "DPI", "EVICTED", "EVICTED_NOTE", "EVICTED_TEXT", "FUTURE", "LEGEND", "MATRIX_LEGEND",
           "NEGATIVE", "NEUTRAL", "POSITIVE", "RESET", "RGB", "SINK_NOTE", "Cell", "add_colorbar", "ansi",
           "cell_notes", "color_scale", "colormap", "display_width", "esc", "figure_png", "hex_color",
           "html_cell", "html_cells", "html_document", "html_json", "html_legend", "image_figure", "layout",
           "matrix_figure", "new_figure", "png_data_uri", "rgb", "rgb_array", "terminal_cell",
           "terminal_legend", "terminal_text", "text_rgb", "token_cells", "tokens_figure", "visible"]
