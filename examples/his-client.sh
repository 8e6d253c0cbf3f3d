#!/bin/sh
# Example HIS client for ehc-agent in shell, with socat.
#
#   examples/his-client.sh /run/ehc-agent/his.sock            # print every message
#   examples/his-client.sh /run/ehc-agent/his.sock 010101 内科  # and report each card's use
#
# It sends a `ping` first: that tells the agent this is HIS, so cards held
# while no HIS was connected are handed to it.
#
# Each line from the agent is one JSON object (docs/his-protocol.md). Without
# jq at hand, the scanId is cut out with sed; with jq, use
# `jq -r 'select(.type=="card").scanId'`.
set -eu
sock=${1:?usage: his-client.sh SOCKET [SCENE [DEPARTMENT]]}
scene=${2:-}
department=${3:-}
command -v socat >/dev/null || { echo "his-client.sh needs socat (apt-get install socat)" >&2; exit 2; }

# socat joins our stdout (requests) to the socket and the socket to our
# stdin (events): a coprocess loop in plain sh, with a FIFO for the replies.
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT INT TERM
mkfifo "$dir/to-agent"
socat "UNIX-CONNECT:$sock" - <"$dir/to-agent" | {
    exec 3>"$dir/to-agent"
    printf '{"type":"ping","ref":"sh-hello"}\n' >&3
    n=0
    while IFS= read -r line; do
        printf '%s\n' "$line"
        case $line in
        *'"type":"card"'*)
            if [ -n "$scene" ]; then
                n=$((n + 1))
                id=$(printf '%s' "$line" | sed -n 's/.*"scanId":"\([^"]*\)".*/\1/p')
                if [ -n "$department" ]; then
                    printf '{"type":"use","scanId":"%s","scene":"%s","department":"%s","ref":"sh-%s"}\n' "$id" "$scene" "$department" "$n" >&3
                else
                    printf '{"type":"use","scanId":"%s","scene":"%s","ref":"sh-%s"}\n' "$id" "$scene" "$n" >&3
                fi
            fi
            ;;
        esac
    done
}
