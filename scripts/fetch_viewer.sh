#!/usr/bin/env bash
# Fetch the prebuilt OHIF v3 viewer (npm package @ohif/app, ~50 MB) into ./viewer/dist, where the
# node serves it at /viewer (NNUNET_NODE_VIEWER_DIR points elsewhere). Needs npm; runs once.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${OHIF_VERSION:-3.13.2}
target=${1:-viewer}
if [ -f "$target/dist/index.html" ] && [ "$(cat "$target/VERSION" 2>/dev/null)" = "$version" ]; then
    echo "viewer: OHIF $version already in $target/dist"
    exit 0
fi
command -v npm >/dev/null || { echo "viewer: npm is needed (apt-get install npm)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack "@ohif/app@$version" --silent >/dev/null && tar xzf "ohif-app-$version.tgz")
[ -f "$work/package/dist/index.html" ] || { echo "viewer: the package has no dist/index.html" >&2; exit 1; }
rm -rf "$target/dist"
mkdir -p "$target"
mv "$work/package/dist" "$target/dist"
cp "$work/package/LICENSE" "$target/LICENSE" 2>/dev/null || true
echo "$version" > "$target/VERSION"
echo "viewer: OHIF $version in $target/dist ($(du -sh "$target/dist" | cut -f1))"
