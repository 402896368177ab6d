#!/bin/bash
# Fetch (here, with PyPI) the wheels the GPU machine lacks, into .whl/ (git-ignored via .git/info/exclude), for
# tests/bench/gpu_check.sh. That machine has torch, transformers, numpy, PIL, safetensors, einops, timm; it lacks
# what A1111's model code needs: ldm (stable-diffusion-sdkit), omegaconf (+ antlr4), pytorch_lightning 1.9 (ldm
# imports its 1.x API; 1.9 needs pkg_resources, hence setuptools 81), open_clip (the offline CLIP tokenizer's BPE)
# and ftfy. All pure Python, 4 MB together.
set -e
cd "$(dirname "$0")/../.."
if [ -z "${PIP:-}" ]; then [ -x .venv/bin/pip ] && PIP=.venv/bin/pip || PIP="python3 -m pip"; fi
mkdir -p .whl .git/info
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d .whl \
    stable-diffusion-sdkit==2.1.5 omegaconf==2.2.3 pytorch_lightning==1.9.4 open-clip-torch==2.20.0 \
    ftfy==6.1.1 wcwidth==0.2.13 setuptools==81.0.0
# antlr4-python3-runtime 4.9.3 (omegaconf 2.2's pin) is published as a source archive only: build its wheel here
[ -f .whl/antlr4_python3_runtime-4.9.3-py3-none-any.whl ] || $PIP wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls .whl
