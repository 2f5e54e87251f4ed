#!/usr/bin/env bash
# Install Sluice into ./.venv on a fresh Debian machine: system packages, the CPU build of
# torch first (so nothing pulls CUDA), then the project with every dependency pinned by
# constraints.txt.   ./install.sh          API + workers
#                    ./install.sh --dev    + test and benchmark tools
set -euo pipefail
cd "$(dirname "$0")"

extras="api,worker"
[[ "${1:-}" == "--dev" ]] && extras="api,worker,dev"

# poppler/tesseract: PDF and OCR tooling for unstructured; libmagic: type sniffing.
need_apt=()
command -v pdftoppm >/dev/null 2>&1 || need_apt+=(poppler-utils)
command -v tesseract >/dev/null 2>&1 || need_apt+=(tesseract-ocr)
ldconfig -p 2>/dev/null | grep -q 'libmagic\.so\.1' || need_apt+=(libmagic1)
if ((${#need_apt[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
  else
    echo "install.sh: please install: ${need_apt[*]} (apt-get install ${need_apt[*]})" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install torch==2.13.0
"${pip[@]}" install -c constraints.txt -e ".[${extras}]"
# unstructured[pdf] drags in a CUDA-linked torchvision (and timm) that break transformers'
# import; only unstructured's hi_res path wants them, and that path cannot work offline.
"${pip[@]}" uninstall -y torchvision timm >/dev/null 2>&1 || true
.venv/bin/python -c "import sluice, sentence_transformers, unstructured" \
  && echo "Sluice installed in .venv"
