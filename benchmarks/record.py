"""One results file per run: `benchmarks/results/<suite>-<UTC timestamp>.jsonl`, one JSON object a line (in the
folder `HF_MOE_RESULTS` names instead, where set: e.g. the folder a remote machine sends back).

The folder is ignored by git: raw results are the lab's, and any number a document relies on is quoted in its
decision record under `docs/decisions/`.
"""

from __future__ import annotations

import json
import os
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

import torch

from .timing import synchronize

RESULTS = Path(__file__).resolve().parent / "results"


def results_folder() -> Path:
    """Where runs write their results: `HF_MOE_RESULTS` if set, else `RESULTS`."""
    return Path(os.environ["HF_MOE_RESULTS"]) if os.environ.get("HF_MOE_RESULTS") else RESULTS


def suite_name(module: str) -> str:
    """The suite a module runs: `benchmarks.ep_scaling` → `ep-scaling`."""
    return module.rsplit(".", 1)[-1].replace("_", "-")


class ResultFile:
    """Rows of one run, written as they come (a run that fails half way keeps its rows). The file opens on the first
    row, so a run that writes none leaves none; `close` prints its path. `path` given: append there instead."""

    def __init__(self, module: str, path: str | Path | None = None) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.path = Path(path) if path else results_folder() / f"{suite_name(module)}-{stamp}.jsonl"
        self._file: IO[str] | None = None

    def write(self, row: dict) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            print(f"results: {self.path}", flush=True)

    def __enter__(self) -> ResultFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def error_row(what: str, e: BaseException) -> dict:
    """The error and the one it replaced, if any: a capture that fails inside reports CUDA's "operation failed due
    to a previous error during capture" from `capture_end`, which hides the error that invalidated the capture."""
    try:
        synchronize("cuda" if torch.cuda.is_available() else "cpu")
    except Exception:  # noqa: BLE001 - a failed capture may leave an error behind
        pass
    row = {"what": what, "error": f"{type(e).__name__}: {e}"[:300],
           "where": "".join(traceback.format_tb(e.__traceback__)[-2:])[-500:]}
    cause = e.__cause__ or e.__context__
    if cause is not None:
        row["cause"] = f"{type(cause).__name__}: {cause}"[:400]
        row["cause_where"] = "".join(traceback.format_tb(cause.__traceback__)[-3:])[-900:]
    return row
