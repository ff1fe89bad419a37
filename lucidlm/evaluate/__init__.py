"""Evaluating explanations: faithfulness metrics (deletion, insertion, comprehensiveness,
sufficiency, ABPC) of token attributions, for any explanation method.

* :func:`faithfulness` (:mod:`lucidlm.evaluate.metrics`): the metrics and their curves;
* :class:`FaithfulnessResult` (:mod:`lucidlm.evaluate.result`): per-explanation values, means,
  JSON, a table and :meth:`~FaithfulnessResult.plot`;
* ``lucidlm faithfulness DIR`` (:mod:`lucidlm.commands.faithfulness`) on an ``explain-dataset`` directory, and
  ``lucidlm bench faithfulness`` (every method on the same prompts) are built on them;
* :class:`~lucidlm.evaluate.harness.LucidLM` (:mod:`lucidlm.evaluate.harness`, imported on demand: it
  needs ``pip install lucidlm[eval]``): lm-evaluation-harness on lucidlm's own model, behind
  ``lucidlm evaluate MODEL --tasks ...``.

>>> from lucidlm.evaluate import faithfulness, METRICS
>>> METRICS
('deletion', 'insertion', 'comprehensiveness', 'sufficiency', 'abpc')
"""

from .metrics import FRACTIONS, METRICS, SCORES, default_replacement, faithfulness
from .result import HIGHER_IS_BETTER, ExampleResult, FaithfulnessResult

__all__ = ["FRACTIONS", "HIGHER_IS_BETTER", "METRICS", "SCORES", "ExampleResult", "FaithfulnessResult",
           "default_replacement", "faithfulness"]
