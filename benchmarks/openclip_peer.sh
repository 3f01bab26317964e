#!/usr/bin/env bash
# open_clip's own trainer (open_clip_train --distill-model) as the speed peer of a trial.
# open_clip_train breaks on webdataset >= 0.2.96 (KeyError 'fname'; its `training` extra pins
# <= 0.2.86) while this project uses webdataset 1.0.2, so the peer gets a venv of its own with the
# same torch/torchvision/open_clip pins and webdataset 0.2.86. Arguments go to openclip_peer.py.
#
#   CONACLIP_HOME=~/.cache/conaclip bash benchmarks/openclip_peer.sh --steps 90
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PEER_VENV:-runs/bench/openclip-venv}
if [ ! -f "$VENV/.installed" ]; then
  ${PYTHON:-python3.11} -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet -c constraints.txt torch==2.13.0 torchvision==0.28.0
  # Not -c constraints.txt below: it pins webdataset 1.0.2, the version the peer cannot use.
  "$VENV/bin/python" -m pip install --quiet torch==2.13.0 torchvision==0.28.0 \
    open_clip_torch==3.3.0 webdataset==0.2.86 braceexpand pandas fsspec
  touch "$VENV/.installed"
fi
exec "$VENV/bin/python" benchmarks/openclip_peer.py "$@"
