#!/usr/bin/env bash
# Starts the node on its embedded defaults: SQLite and the archive under ./data (NNUNET_NODE_DATA),
# the bundled demo models (model-serve-spec.yaml), HTTP on NNUNET_SERVE_PORT (12345) and DIMSE on
# NNUNET_NODE_DICOM_PORT (11112). A demo phantom study is written to data/demo-study on first start.
set -euo pipefail
cd "$(dirname "$0")/.."

export NNUNET_NODE_DATA=${NNUNET_NODE_DATA:-data}
port=${NNUNET_SERVE_PORT:-12345}
.venv/bin/nnunet-node db upgrade
if [ ! -d "$NNUNET_NODE_DATA/demo-study" ]; then
    .venv/bin/python -m nnunet_node.core.phantom --out "$NNUNET_NODE_DATA/demo-study" --seed 7
fi
study=$(cd "$NNUNET_NODE_DATA/demo-study" && pwd)
cat <<EOM

nnunet-node: HTTP on http://127.0.0.1:$port, DIMSE AE ${NNUNET_NODE_AE_TITLE:-NNUNET_NODE} on port ${NNUNET_NODE_DICOM_PORT:-11112}
A demo study is in $study. Try, from another terminal:
  curl -s http://127.0.0.1:$port/model_info
  curl -s -X POST http://127.0.0.1:$port/infer -H 'Content-Type: application/json' \\
    -d '{"nnunet_id": "phantom", "study_path": "$study", "series_folders": ["dicom/ct"], "is_dicom": true, "save_rt_struct_output": true}'
  .venv/bin/nnunet-node demo      # sends the demo study by C-STORE and follows the routed job

EOM
exec .venv/bin/nnunet-node serve
