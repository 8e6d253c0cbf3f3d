#!/usr/bin/env python3
"""ehc-agent's local HTTP API from Python (standard library only).

Long-polls for scan events; for each card, tells the agent what it was used
for (POST /v1/use). The same JSON objects as the socket protocol
(docs/his-protocol.md, "HTTP API").

    python3 his-http-client.py [--base http://127.0.0.1:7412]
        [--token-file /run/ehc-agent/his.token] [--scene 010101] [--once]

--once: exit 0 after the first card has been used (for tests).
"""
import argparse
import json
import sys
import time
import urllib.error
import urllib.request


def call(base, token, path, body=None, timeout=40):
    req = urllib.request.Request(
        base + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        # The agent says why in the body: {"type":"error","message":...}
        return json.load(e)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="http://127.0.0.1:7412")
    ap.add_argument("--token-file", default="/run/ehc-agent/his.token")
    ap.add_argument("--scene", default="010101")
    ap.add_argument("--once", action="store_true")
    a = ap.parse_args()
    with open(a.token_file) as f:
        token = f.read().strip()
    after = 0
    while True:
        try:
            got = call(a.base, token, f"/v1/events?after={after}&wait=30")
        except OSError as e:
            print("ehc-agent not answering:", e, file=sys.stderr)
            time.sleep(2)
            continue
        if "events" not in got:
            print("refused:", got.get("message"), file=sys.stderr)
            return 1
        after = got["last"]
        for item in got["events"]:
            ev = item["event"]
            print(json.dumps(ev, ensure_ascii=False), flush=True)
            if ev.get("type") == "card":
                reply = call(a.base, token, "/v1/use", {"scanId": ev["scanId"], "scene": a.scene})
                print(json.dumps(reply, ensure_ascii=False), flush=True)
                if a.once:
                    return 0 if reply.get("type") == "reply" else 1


if __name__ == "__main__":
    sys.exit(main())
