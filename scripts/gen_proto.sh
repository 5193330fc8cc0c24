#!/usr/bin/env bash
# Regenerate the stubs in proto/ from proto/fedscore_scoring.proto (run from anywhere; needs grpcio-tools).
# The generated files are committed; after regenerating, the grpc module's absolute import is made relative so the
# stubs import as a package, and a `# ruff: noqa` header keeps the linter off generated code.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="$ROOT/proto"
mkdir -p "$OUT"
"$PYTHON" -m grpc_tools.protoc -I "$ROOT/proto" --python_out="$OUT" --grpc_python_out="$OUT" --pyi_out="$OUT" \
  "$ROOT/proto/fedscore_scoring.proto"
sed -i 's/^import fedscore_scoring_pb2 as /from . import fedscore_scoring_pb2 as /' "$OUT/fedscore_scoring_pb2_grpc.py"
for f in "$OUT"/fedscore_scoring_pb2.py "$OUT"/fedscore_scoring_pb2_grpc.py "$OUT"/fedscore_scoring_pb2.pyi; do
  if ! head -n 1 "$f" | grep -q '^# ruff: noqa'; then
    printf '# ruff: noqa\n%s\n' "$(cat "$f")" > "$f"
  fi
done
cat > "$OUT/__init__.py" <<'PY'
"""Generated gRPC stubs for proto/fedscore_scoring.proto, imported by both parties from here (do not edit;
regenerate with scripts/gen_proto.sh)."""
PY
echo "generated $OUT"
