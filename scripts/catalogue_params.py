"""Write ``lucidlm/catalogue/params.json``: the parameter count of every catalogue entry and registered config.

``lucidlm models`` reads the counts from that file instead of building each model on the meta device
(which needs torch: seconds before the first line). ``tests/test_cli_models.py`` fails when the
file is stale; then run, from the repository root:

    python scripts/catalogue_params.py
"""

from __future__ import annotations

import json
import sys

from lucidlm.catalogue import CATALOGUE, PARAMS_FILE
from lucidlm.config import REGISTRY, Config
from lucidlm.fileio import atomic_write
from lucidlm.model.size import parameter_count


def counts() -> dict[str, int]:
    return {name: parameter_count(Config.from_name(name)) for name in sorted([*CATALOGUE, *REGISTRY], key=str.lower)}


def main() -> int:
    atomic_write(PARAMS_FILE, json.dumps(counts(), indent=1) + "\n")
    print(f"wrote {PARAMS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
