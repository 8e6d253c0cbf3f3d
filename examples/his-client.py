#!/usr/bin/env python3
"""Example HIS client for ehc-agent (Python 3, standard library only).

Connects to the agent's Unix socket (or loopback TCP), prints every message,
and for each `card` optionally tells the agent which use it was (`use`) and
binds it to a hospital patient id (`bind`). It reconnects when the agent
restarts or reloads, as an HIS integration must.

    python3 his-client.py --unix /run/ehc-agent/his.sock
    python3 his-client.py --tcp 127.0.0.1:7410 --token-file /run/ehc-agent/his.token \
        --use 010101 --department 内科 --count 1

On TCP the first message is `auth` with the HIS token (readable by the HIS
group). On both, a first message (`auth` or `ping`) tells the agent this is
HIS, so cards held while no HIS was connected are handed over.
See docs/his-protocol.md for the messages.
"""

import argparse
import json
import socket
import sys
import time


def connect(args):
    if args.unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(args.unix)
    else:
        host, port = args.tcp.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
    return sock


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--unix", help="path of the agent's HIS socket")
    where.add_argument("--tcp", help="HOST:PORT of the agent's loopback TCP listener")
    ap.add_argument("--token-file", default="/run/ehc-agent/his.token",
                    help="the HIS token, for --tcp (default: %(default)s)")
    ap.add_argument("--use", metavar="SCENE", help="send a `use` with this scene for each card")
    ap.add_argument("--department", help="department for --use")
    ap.add_argument("--bind", metavar="PATID", help="send a `bind` with this patient id for each card")
    ap.add_argument("--count", type=int, default=0, help="exit after this many cards (0: run forever)")
    args = ap.parse_args()

    cards = 0
    ref = 0
    waiting = set()  # refs of requests not answered yet
    while True:
        try:
            sock = connect(args)
        except OSError as e:
            print(f"cannot connect ({e}); retrying in 1 s", file=sys.stderr, flush=True)
            time.sleep(1)
            continue
        reader = sock.makefile("r", encoding="utf-8", newline="\n")
        writer = sock.makefile("w", encoding="utf-8", newline="\n")

        def send(msg: dict) -> None:
            writer.write(json.dumps(msg, ensure_ascii=False) + "\n")
            writer.flush()

        try:
            if args.tcp:
                with open(args.token_file, encoding="utf-8") as f:
                    send({"type": "auth", "token": f.read().strip(), "ref": "auth"})
            else:
                send({"type": "ping", "ref": "hello"})
            for line in reader:
                msg = json.loads(line)
                print(json.dumps(msg, ensure_ascii=False), flush=True)
                kind = msg.get("type")
                if kind == "card":
                    cards += 1
                    if args.use:
                        ref += 1
                        use = {"type": "use", "scanId": msg["scanId"], "scene": args.use, "ref": str(ref)}
                        if args.department:
                            use["department"] = args.department
                        send(use)
                        waiting.add(str(ref))
                    if args.bind:
                        ref += 1
                        send({"type": "bind", "scanId": msg["scanId"], "patid": args.bind, "ref": str(ref)})
                        waiting.add(str(ref))
                elif kind in ("reply", "error"):
                    waiting.discard(str(msg.get("ref")))
                    if kind == "error":
                        print("agent refused a request: " + msg.get("message", ""), file=sys.stderr, flush=True)
                        if msg.get("ref") == "auth":
                            return 1
                if args.count and cards >= args.count and not waiting:
                    return 0
        except OSError as e:
            print(f"connection lost ({e})", file=sys.stderr, flush=True)
        finally:
            sock.close()
        # Requests in flight on a lost connection get no answer.
        waiting.clear()
        print("agent closed the connection; reconnecting in 1 s", file=sys.stderr, flush=True)
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
