# Shared by .ci/run and .ci/quickstart: create (or reuse) the pinned venv. Sourced, not executed.
PY=${PYTHON:-python3}
VENV=${LORA_STUDIO_VENV:-.venv}
STAMP="$VENV/.requirements-test.sha"
want=$(sha256sum requirements-test.txt | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "[setup] creating $VENV with the pinned requirements (torch 2.13.0 CPU, the A1111 v1.10.1 pins)"
    "$PY" -m venv "$VENV"
    # torch first, from PyTorch's CPU index too: PyPI's Linux wheel is the CUDA build (GBs of nvidia-* wheels).
    # A local +cpu wheel (find-links) wins as well; an unreachable index only costs a warning.
    "$VENV/bin/pip" install -q --disable-pip-version-check --retries 1 --timeout 20 \
        --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements-test.txt
    # Must come last: PyPI's torchvision for torch 2.13 is a CUDA build that breaks open_clip on CPU, and
    # stable-diffusion-sdkit's declared dependencies are wrong for A1111 (hence --no-deps), and k-diffusion's
    # (training extras, wandb) are not needed for its sampler code, the test reference of our samplers.
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps stable-diffusion-sdkit==2.1.5 torchvision==0.16.2 \
        k-diffusion==0.0.16
    echo "$want" > "$STAMP"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
