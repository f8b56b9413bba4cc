"""One module per scoring method; each defines a `@register_scorer` class.

Modules here are imported automatically by `vllm_kvzip.scoring.base`.
"""
