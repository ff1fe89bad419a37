"""The ``lucidlm`` commands: one module per command (or per closely related group), each describing
its commands as :class:`~lucidlm.commands.options.Command` records; :mod:`lucidlm.cli` builds the
parser from them and runs one.

This is the top floor: the library never imports it. Every module here is torch-free at import
(``lucidlm --help`` and argument errors answer at once); a command imports what it needs when it
runs.

* :mod:`.options`: the parser class, argument types, shared option groups (model, KV cache,
  sampling) and the :class:`~lucidlm.commands.options.Command` record;
* :mod:`.checks`: what is checked before anything loads (exit status 2 and one line);
* :mod:`.generate` (generate, chat), :mod:`.explain`, :mod:`.explain_dataset`, :mod:`.diff`,
  :mod:`.diff_report`, :mod:`.evaluate` (benchmarks through lm-eval), :mod:`.faithfulness`,
  :mod:`.convert` (convert, download, merge), :mod:`.train` (finetune, pretrain), :mod:`.models`,
  :mod:`.serve` (serve, view), :mod:`.cache`, :mod:`.bench`.
"""
