"""The names of the explanation methods lucidlm implements.

Torch-free, so that the command line can offer them without loading a model;
:mod:`lucidlm.model.rules` (where the LRP methods live) re-exports the tuple as ``rules.METHODS``.
"""

#: the LRP-style methods: one forward under the rules of :mod:`lucidlm.model.rules`, one backward
#: (the one list: CLI, benches, server and patches use it)
METHODS = ("attnlrp", "cp-lrp", "inputxgrad")

#: the baselines every method is compared with (:mod:`lucidlm.explain.baselines`): not rule-based,
#: so the ``transformers`` patch layer does not offer them
BASELINES = ("integrated-gradients", "occlusion", "attention-rollout", "random")

#: everything ``llm.explain(method=...)`` accepts
EXPLAIN_METHODS = METHODS + BASELINES
