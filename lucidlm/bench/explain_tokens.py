"""``lucidlm bench explain --checkpointing``: peak memory and time of one explanation against the
prompt's length, plain and with activation checkpointing (:mod:`lucidlm.model.checkpointing`) side
by side.

One row per (method, length); each cell is its own fresh child process (``lucidlm.bench.explain``'s
child: load the model, warm up on 16 tokens, explain once at full length). **peak MiB** is the child
process's peak RSS over its whole life (``VmHWM``: the weights, the tokenizer, Python, torch and the
explanation together: what the machine must hold), **+MiB** the part the explanation added to the
RSS it started from, **s** the time of that explanation (``--repeats N``: the median of N more).

>>> r = {("attnlrp", 8, False): {"seconds": 2.0, "peak_mib": 30.0, "process_peak_mib": 500.0},
...      ("attnlrp", 8, True): {"seconds": 3.0, "peak_mib": 10.0, "process_peak_mib": 480.0}}
>>> format_row(r, "attnlrp", 8).replace("|", "").split()
['attnlrp', '8', '2.0', '500', '30', '3.0', '480', '10', '0.33×', '1.50×']
"""

from __future__ import annotations

from . import emit, prepare_model, progress

HEADER = (f"{'method':<10}{'tokens':>7} | {'plain: s':>9}{'peak MiB':>10}{'+MiB':>8} | "
          f"{'checkpointed: s':>16}{'peak MiB':>10}{'+MiB':>8} | {'+MiB ×':>7}{'time ×':>8}")


def run(args, methods: list[str], lengths: list[int], child) -> int:
    """Measure every (method, length, plain | checkpointed) in a child (``child(args, row, length,
    checkpointing)`` -> its JSON) and print a row as soon as its two cells are in."""
    import torch

    prepare_model(args.model)
    threads = args.threads or torch.get_num_threads()
    emit(f"explanation memory against tokens: {args.model or 'embedded SmolLM2-135M-Instruct'}, {args.dtype}, "
         f"CPU, torch threads {threads}; each cell its own process; peak MiB = the process's peak RSS, "
         f"+MiB = what the explanation added to it")
    emit(HEADER)
    results: dict = {}
    with progress(2 * len(methods) * len(lengths), "bench explain --checkpointing") as bar:
        for method in methods:
            for n in lengths:
                for checkpointed in (False, True):
                    bar.set_postfix_str(f"{method}, {n} tokens{', checkpointed' if checkpointed else ''}")
                    results[(method, n, checkpointed)] = child(args, method, n, checkpointed)
                    bar.update(1)
                emit(format_row(results, method, n))
    return 0


def _cells(r: dict) -> str:
    if "error" in r:
        return f"{'failed: ' + r['error'][:25]:>35}"
    peak = "n/a" if r.get("process_peak_mib") is None else f"{r['process_peak_mib']:.0f}"
    added = "n/a" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
    return f"{r['seconds']:>9.1f}{peak:>10}{added:>8}"


def format_row(results: dict, method: str, n: int) -> str:
    """One (method, length): plain cells, checkpointed cells, and checkpointed × plain (memory the
    explanation added, time)."""
    plain, saved = results[(method, n, False)], results[(method, n, True)]
    ratios = ""
    if "seconds" in plain and "seconds" in saved:
        memory = (f"{saved['peak_mib'] / plain['peak_mib']:.2f}×" if saved.get("peak_mib") is not None
                  and plain.get("peak_mib") else "n/a")
        ratios = f"{memory:>7}{saved['seconds'] / plain['seconds']:>7.2f}×"
    return f"{method:<10}{n:>7} | {_cells(plain)} | {_cells(saved):>34} | {ratios}"
