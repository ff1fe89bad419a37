"""Evaluating explanations: faithfulness metrics (deletion, insertion, comprehensiveness,
sufficiency, ABPC) of token attributions, for any explanation method.

* :func:`faithfulness` (:mod:`lucidlm.evaluate.metrics`): the metrics and their curves;
* :class:`FaithfulnessResult` (:mod:`lucidlm.evaluate.result`): per-explanation values, means,
  JSON, a table and :meth:`~FaithfulnessResult.plot`;
* ``lucidlm evaluate DIR`` (:mod:`lucidlm.commands.evaluate`) on an ``explain-dataset`` directory, and
  ``lucidlm bench faithfulness`` (every method on the same prompts) are built on them.

>>> from lucidlm.evaluate import faithfulness, METRICS
>>> METRICS
('deletion', 'insertion', 'comprehensiveness', 'sufficiency', 'abpc')
"""

from .metrics import FRACTIONS, METRICS, SCORES, default_replacement, faithfulness
from .result import HIGHER_IS_BETTER, ExampleResult, FaithfulnessResult

__all__ = ["FRACTIONS", "HIGHER_IS_BETTER", "METRICS", "SCORES", "ExampleResult", "FaithfulnessResult",
           "default_replacement", "faithfulness"]
