"""Renderings of explanations: what the result types of :mod:`lucidlm.explain.explanation` draw.

* :mod:`~lucidlm.render.cells`: the one colour map, the colour scale and how a token is displayed
  (every rendering below draws :class:`~lucidlm.render.cells.Cell` s);
* :mod:`~lucidlm.render.terminal`: ANSI text; :mod:`~lucidlm.render.html`: self-contained pages
  and the one escaping of JSON inside ``<script>``; :mod:`~lucidlm.render.png`: matplotlib figures
  drawn outside pyplot;
* ``static/heatmap.js``: the one JavaScript renderer, inlined by the HTML export of a
  ``GenerationExplanation`` and by the viewer page (:mod:`lucidlm.serve.viewer`).

The wire format the pages read is the explanations' own ``to_dict()`` (README, "Wire format").
Nothing here imports the result types: they call these functions with their fields.
"""
