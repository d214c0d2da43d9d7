#!/usr/bin/env bash
# Provision one host for autoresearch: env/autoresearch/vendor.sh DIR
#
# Idempotent (a host already provisioned at the pinned commit returns at once) and safe to run on
# many hosts at once: everything that can be shared (DIR, $HOME's data cache) is written under an
# flock, and what must be per host (the uv cache, the attention kernel) goes to a host-local cache.
# Makes: the pinned checkout, its environment (uv sync --frozen), data and tokenizer (prepare.py),
# the FlashAttention kernel that train.py fetches at import, already in the local hub cache, and
# DIR/.rfs-env, the variables every run gets (rfs's runner reads it) so that no run needs a network.
# Needs git, uv and network on this host, once. rfs never runs this on CI or the embedded machine.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="$(mkdir -p "${1:?usage: vendor.sh DIR}" && cd "$1" && pwd)"
url="$(sed -n 's/^url = //p' "$here/UPSTREAM")"
commit="$(sed -n 's/^commit = //p' "$here/UPSTREAM")"
local_cache="${RFS_LOCAL_CACHE:-/var/tmp/rfs-autoresearch-$(id -u)}"  # per host, never shared
mkdir -p "$local_cache"

exec 9>"$dir.lock"
flock 9  # one provisioner per DIR; the others wait, then find it done
stamp="$dir/.rfs-provisioned"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$commit" ] && [ -f "$local_cache/.kernel-$commit" ]; then
    echo "autoresearch $commit already provisioned in $dir"
    exit 0
fi

if [ ! -d "$dir/.git" ]; then
    git -C "$dir" init --quiet
    git -C "$dir" remote add origin "$url"
fi
git -C "$dir" fetch --quiet --depth 1 origin "$commit"
git -C "$dir" checkout --quiet --force --detach "$commit"
test "$(git -C "$dir" rev-parse HEAD)" = "$commit"

# The pristine files, checked against UPSTREAM: restored before every run, hashes recorded in every trace.
mkdir -p "$dir/.rfs-pristine"
cp "$dir/prepare.py" "$dir/train.py" "$dir/.rfs-pristine/"
(cd "$dir/.rfs-pristine" && sha256sum prepare.py train.py) | while read -r sum name; do
    want="$(sed -n "s/^${name%.py}_sha256 = //p" "$here/UPSTREAM")"
    test "$sum" = "$want" || { echo "$name: sha256 $sum is not the pinned $want" >&2; exit 1; }
done

export UV_CACHE_DIR="$local_cache/uv" HF_HOME="$local_cache/hf"
(cd "$dir" && uv sync --frozen --quiet)
# prepare.py writes under $HOME/.cache/autoresearch, which hosts may share: one writer at a time.
mkdir -p "$HOME/.cache"
(flock 8; cd "$dir" && uv run --frozen prepare.py) 8>"$HOME/.cache/autoresearch.lock"

# train.py fetches its attention kernel from the hub at import: fetch the same repos now, into
# this host's cache, so that runs can be offline.
repos="$(grep -o 'get_kernel([^)]*)' "$dir/train.py" | sed -E "s/get_kernel\\(['\"]([^'\"]+)['\"].*/\\1/" | sort -u)"
for repo in $repos; do
    (cd "$dir" && uv run --frozen python -c "import sys; from kernels import get_kernel; get_kernel(sys.argv[1])" "$repo")
done
touch "$local_cache/.kernel-$commit"

cat >"$dir/.rfs-env" <<VARS
HF_HOME=$local_cache/hf
HF_HUB_OFFLINE=1
TRANSFORMERS_OFFLINE=1
HF_DATASETS_OFFLINE=1
UV_CACHE_DIR=$local_cache/uv
UV_OFFLINE=1
VARS
echo "$commit" >"$stamp"
echo "autoresearch $commit provisioned in $dir (host cache $local_cache)"
