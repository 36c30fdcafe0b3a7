#!/usr/bin/env bash
# Fetch the wheels that bench/gpu.sh and bench/commands.sh install on a GPU machine whose image has torch but not
# diffusers (transformers, tokenizers and accelerate are for the whole pipeline that bench/commands.py runs).
# Run here (with PyPI access), in the repository root; .whl/ is git-ignored and travels with the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 --platform any"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d .whl \
    accelerate==1.15.0 \
    annotated-doc==0.0.7 \
    anyio==4.16.0 \
    certifi==2026.10.19.post1 \
    charset-normalizer==3.5.3 \
    click==8.5.1 \
    diffusers==0.42.1 \
    filelock==4.3.1 \
    fsspec==2026.9.0 \
    h11==0.16.0 \
    httpcore2==2.16.2 \
    httpx2==2.16.2 \
    huggingface-hub==2.4.0 \
    idna==3.20 \
    importlib-metadata==10.2.0 \
    lazy-importer==0.1.0 \
    markdown-it-py==4.3.0 \
    mdurl==0.1.2 \
    numpy==2.5.5 \
    packaging==26.4 \
    pillow==13.0.0 \
    prodigyopt==1.1.2 \
    pygments==2.21.0 \
    pyyaml==6.0.4 \
    regex==2026.11.19 \
    requests==2.34.2 \
    rich==15.0.0 \
    safetensors==0.8.0 \
    shellingham==1.5.4 \
    sniffio==1.3.1 \
    tokenizers==0.23.3 \
    tqdm==4.70.1 \
    transformers==5.24.0 \
    truststore==0.10.5 \
    typer==0.29.2 \
    typing-extensions==4.16.0 \
    urllib3==2.8.0 \
    zipp==4.1.2
du -sh .whl
