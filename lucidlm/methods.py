"""The names of the explanation methods lucidlm implements.

Torch-free, so that the command line can offer them without loading a model;
:mod:`lucidlm.model.rules` (where the methods live) re-exports the tuple as ``rules.METHODS``.
"""

#: every explanation method lucidlm implements (the one list: CLI, benches, server and patches use it)
METHODS = ("attnlrp", "cp-lrp", "inputxgrad")
