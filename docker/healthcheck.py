"""Container health check: GET /ping with the inference key (token auth covers /ping too)."""
import json
import sys
import urllib.request

try:
    with open("/home/model-server/key_file.json") as f:
        key = json.load(f)["inference"]["key"]
    req = urllib.request.Request("http://127.0.0.1:8080/ping", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        sys.exit(0 if json.load(resp).get("status") == "Healthy" else 1)
except Exception:  # any failure is "unhealthy"; docker only reads the exit code
    sys.exit(1)
