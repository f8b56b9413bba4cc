"""Where a kernel benchmark writes its JSON: `benchmarks/results/NAME[_TAG].json`, with its command."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_results(out_dir: str | Path, name: str, tag: str, payload: dict) -> Path:
    """Write `{"command": ..., **payload}` to OUT_DIR/NAME[_TAG].json and say where."""
    out = Path(out_dir) / (name + (f"_{tag}" if tag else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/" + Path(sys.argv[0]).name + "".join(" " + arg for arg in sys.argv[1:])
    out.write_text(json.dumps({"command": command, **payload}, indent=1))
    print(f"wrote {out}")
    return out
