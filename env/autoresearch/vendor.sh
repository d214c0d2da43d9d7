#!/usr/bin/env bash
# Clone the pinned karpathy/autoresearch commit into DIR and prepare its data (GPU hosts only).
#   env/autoresearch/vendor.sh DIR
# Needs git, uv and network on that host; rfs never runs this on CI or the embedded machine.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${1:?usage: vendor.sh DIR}"
url="$(sed -n 's/^url = //p' "$here/UPSTREAM")"
commit="$(sed -n 's/^commit = //p' "$here/UPSTREAM")"
if [ ! -d "$dir/.git" ]; then
    git clone --quiet "$url" "$dir"
fi
git -C "$dir" fetch --quiet origin "$commit"
git -C "$dir" checkout --quiet --detach "$commit"
test "$(git -C "$dir" rev-parse HEAD)" = "$commit"
# The pristine files, checked against UPSTREAM: restored before every run, hashes recorded in every trace.
mkdir -p "$dir/.rfs-pristine"
cp "$dir/prepare.py" "$dir/train.py" "$dir/.rfs-pristine/"
(cd "$dir/.rfs-pristine" && sha256sum prepare.py train.py) | while read -r sum name; do
    want="$(sed -n "s/^${name%.py}_sha256 = //p" "$here/UPSTREAM")"
    test "$sum" = "$want" || { echo "$name: sha256 $sum is not the pinned $want" >&2; exit 1; }
done
(cd "$dir" && uv sync && uv run prepare.py)
echo "autoresearch $commit vendored in $dir"
