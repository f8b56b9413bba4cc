"""Where a kernel benchmark writes its JSON: `benchmarks/results/NAME[_TAG].json`, with its command."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def command_line() -> str:
    """The command that is running, as `python benchmarks/SCRIPT ARGS` (what a result file records)."""
    return "python benchmarks/" + Path(sys.argv[0]).name + "".join(" " + arg for arg in sys.argv[1:])


def write_results(out_dir: str | Path, name: str, tag: str, payload: dict) -> Path:
    """Write `{"command": ..., **payload}` to OUT_DIR/NAME[_TAG].json and say where."""
    out = Path(out_dir) / (name + (f"_{tag}" if tag else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command_line(), **payload}, indent=1))
    print(f"wrote {out}")
    return out
