#!/usr/bin/env bash
# Performs the Dockerfile's build and runtime steps without a Docker engine: builds the wheel in
# a fresh venv, installs it alone, then starts `adscore serve` (the image's CMD) from outside the
# source tree with the image's environment, scores one request and stops it with SIGTERM.
# Needs python3.11 and redis-server. Exit 0 means the image's steps work.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
work="$(mktemp -d)"
server_pid=""
redis_pid=""
cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
    [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
free_port() { "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "smoke: build stage (COPY, venv, build the wheel, install it)"
mkdir -p "$work/src"
cp "$root/pyproject.toml" "$root/README.md" "$work/src/"
for package in service models feature_client; do
    cp -r "$root/$package" "$work/src/$package"
done
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
"$python" -m venv "$work/opt/adscore"
venv="$work/opt/adscore/bin"
"$venv/pip" install --quiet --no-compile build==1.2.2
"$venv/python" -m build --wheel --outdir "$work/wheels" "$work/src" >/dev/null
"$venv/pip" uninstall --quiet -y build pyproject_hooks packaging
"$venv/pip" install --quiet --no-compile "$work"/wheels/*.whl
if "$venv/python" -c 'import torch' 2>/dev/null; then
    echo "smoke: torch is installed in the serving venv" >&2
    exit 1
fi

echo "smoke: runtime stage (demo model baked in, API keys from a file, private redis-server)"
cp -r "$root/demo/model_repository" "$work/models"
redis_port="$(free_port)"
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --daemonize no >"$work/redis.log" 2>&1 &
redis_pid=$!
key="$("$venv/adscore" keys create --file "$work/keys.json" --name smoke --role scorer 2>/dev/null)"
port="$(free_port)"
cd /  # as in the image: nothing of the source tree on the import path
env -i PATH="$venv:/usr/bin:/bin" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    ADSCORE_HOST=127.0.0.1 ADSCORE_PORT="$port" ADSCORE_MODEL_REPOSITORY="$work/models" \
    ADSCORE_API_KEYS_FILE="$work/keys.json" ADSCORE_REDIS_URL="redis://127.0.0.1:$redis_port/0" \
    adscore serve >"$work/serve.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 120); do
    if "$venv/python" -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:$port/readyz', timeout=1).status != 200)" 2>/dev/null; then
        break
    fi
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
    sleep 0.5
done
answer="$("$venv/python" - "$port" "$key" <<'PY'
import json, sys, urllib.request
port, key = sys.argv[1], sys.argv[2]
body = json.dumps({"user_id": "u1", "candidates": [{"ad_id": "a1"}, {"ad_id": "a2"}]}).encode()
request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/score", data=body,
    headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
scores = json.load(urllib.request.urlopen(request, timeout=10))["scores"]
assert len(scores) == 2 and all(0 < s < 1 for s in scores), scores
print(scores)
PY
)"
echo "smoke: scored $answer"
echo "smoke: served from $("$venv/python" -c 'import service; print(service.__file__)')"
kill -TERM "$server_pid"
status=0
wait "$server_pid" || status=$?
server_pid=""
# uvicorn re-raises SIGTERM once it has drained, so 143 after a complete shutdown is graceful.
if [ "$status" -ne 0 ] && { [ "$status" -ne 143 ] || ! grep -q "Application shutdown complete" "$work/serve.log"; }; then
    echo "smoke: adscore exited with $status on SIGTERM" >&2
    cat "$work/serve.log" >&2
    exit 1
fi
echo "smoke: ok (graceful exit on SIGTERM)"
