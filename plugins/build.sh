#!/usr/bin/env bash
# Build the selfheal feedback endpoint plugin with the JDK's javac and jar: the TorchServe
# serving SDK ships inside the torchserve wheel's model-server.jar, so nothing is downloaded.
# Usage: plugins/build.sh PYTHON OUT_DIR   (writes OUT_DIR/selfheal-feedback.jar)
set -euo pipefail
python=${1:?python of the environment holding torchserve}
out=${2:?output directory}
here=$(cd "$(dirname "$0")" && pwd)
command -v javac >/dev/null || { echo "building the plugin needs a JDK 17 (javac): apt-get install openjdk-17-jdk-headless" >&2; exit 1; }
sdk=$("$python" -c 'import pathlib, ts; print(pathlib.Path(ts.__file__).parent / "frontend" / "model-server.jar")')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
javac --release 17 -Xlint:all,-processing -Werror -cp "$sdk" -d "$work" "$here"/feedback/src/org/selfheal/*.java
cp -r "$here/feedback/META-INF" "$work/"
mkdir -p "$out"
jar --create --file "$out/selfheal-feedback.jar" -C "$work" .
echo "built $out/selfheal-feedback.jar"
