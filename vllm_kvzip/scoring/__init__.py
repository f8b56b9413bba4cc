"""KV-importance scoring: KVzip, KVzip+, KVzap, head-level, SnapKV, StreamingLLM, random.

* `functional`      pure tensor math shared with the vLLM worker
* `base`            the `Scorer` interface and registry; methods live in `methods/`
* `policies`        scores -> keep masks (global / layer / head / AdaKV / threshold)
* `kvzap_model`     KVzap surrogates and the nvidia/KVzap-* checkpoint format
* `reconstruction`  KVzip's repeat prompts and chunking
* `hf`              transformers API: KVzipModel(model, tokenizer).prefill(...).prune(...)
* `train`, `head_scores`  command-line tools

`hf` imports transformers; import it explicitly (`from vllm_kvzip.scoring.hf import KVzipModel`).
"""

from vllm_kvzip.scoring.base import (
    LayerInputs,
    Scorer,
    ScorerContext,
    build_scorer,
    get_scorer_class,
    register_scorer,
    scorer_names,
)
from vllm_kvzip.scoring.functional import (
    KVzipPlusTerms,
    kvzip_chunk_scores,
    output_projection_gram,
    output_value_norms,
    random_scores,
    snapkv_scores,
    streaming_scores,
)
from vllm_kvzip.scoring.kvzap_model import KVzapLinear, KVzapMLP, KVzapSurrogate, ModelShape
from vllm_kvzip.scoring.policies import KeepSet, keep_by_ratio, keep_by_threshold

__all__ = [
    "KVzapLinear",
    "KVzapMLP",
    "KVzapSurrogate",
    "KVzipPlusTerms",
    "KeepSet",
    "LayerInputs",
    "ModelShape",
    "Scorer",
    "ScorerContext",
    "build_scorer",
    "get_scorer_class",
    "keep_by_ratio",
    "keep_by_threshold",
    "kvzip_chunk_scores",
    "output_projection_gram",
    "output_value_norms",
    "random_scores",
    "register_scorer",
    "scorer_names",
    "snapkv_scores",
    "streaming_scores",
]
