#!/usr/bin/env bash
# Fetch, here (with network), the wheels the GPU device image lacks for running the HTTP
# server there (it already has torch, triton, numpy, safetensors, sentencepiece, tokenizers,
# prometheus-client, jinja2, uvloop), and py-spy for profiling there. They land in .whl/
# (git-ignored); carry it with the device call:
#   carry: [".whl"], command starting with
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
pkgs="fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.3 pydantic-core==2.50.4
      annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5 anyio==4.16.0
      sniffio==1.3.1 h11==0.16.0 click==8.5.1 opentelemetry-api==1.45.2 importlib-metadata zipp
      pyzmq==27.3.0 msgspec==0.23.0 httptools==0.9.0 py-spy==0.4.3 llguidance==1.9.1"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
  -d .whl $pkgs
ls .whl
