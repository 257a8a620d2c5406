#!/usr/bin/env bash
# Refresh the vendored OpenSeadragon (pinned) from the npm registry into pathopeft/viewer/static/openseadragon/.
set -euo pipefail
VERSION="${1:-5.0.1}"
cd "$(dirname "$0")/.."
DEST=pathopeft/viewer/static/openseadragon
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && npm pack "openseadragon@${VERSION}" >/dev/null && tar xzf "openseadragon-${VERSION}.tgz")
rm -rf "$DEST"
mkdir -p "$DEST"
cp "$TMP/package/build/openseadragon/openseadragon.min.js" "$DEST/"
cp -r "$TMP/package/build/openseadragon/images" "$DEST/"
cp "$TMP/package/LICENSE.txt" "$DEST/LICENSE.txt" 2>/dev/null || cp "$TMP/package/LICENSE"* "$DEST/"
echo "$VERSION" > "$DEST/VERSION"
echo "OpenSeadragon $VERSION -> $DEST"
