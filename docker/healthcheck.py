"""Container health check: GET /ping with the inference key (token auth covers /ping too).

The address comes from the server's own config.properties, so a deployment that
mounts another config (other ports, loopback) is still checked where it listens.
"""
import json
import sys
import urllib.request

HOME = "/home/model-server"


def inference_url() -> str:
    with open(f"{HOME}/config.properties") as f:
        for line in f:
            key, _, value = line.strip().partition("=")
            if key.strip() == "inference_address":
                return value.strip().replace("0.0.0.0", "127.0.0.1")
    return "http://127.0.0.1:8080"


try:
    with open(f"{HOME}/key_file.json") as f:
        key = json.load(f)["inference"]["key"]
    req = urllib.request.Request(f"{inference_url()}/ping", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        sys.exit(0 if json.load(resp).get("status") == "Healthy" else 1)
except Exception:  # any failure is "unhealthy"; docker reads only the exit code
    sys.exit(1)
