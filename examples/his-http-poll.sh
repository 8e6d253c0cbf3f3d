#!/bin/sh
# ehc-agent's local HTTP API from a shell: long-poll for scan events and
# print each one (one JSON object per line). For HIS clients that call local
# services instead of holding a socket (docs/his-protocol.md, "HTTP API").
#
#   EHC_HTTP=http://127.0.0.1:7412 ./his-http-poll.sh
#
# The HIS token is read from EHC_TOKEN_FILE (default /run/ehc-agent/his.token;
# your user must be in the ehc-his group). Needs curl and sed.
set -u
BASE=${EHC_HTTP:-http://127.0.0.1:7412}
TOKEN=$(cat "${EHC_TOKEN_FILE:-/run/ehc-agent/his.token}") || exit 1
after=0
while :; do
    # Answers at once with what came after `after`, or waits up to 30 s.
    if ! out=$(curl -sS --fail-with-body --max-time 40 \
        -H "Authorization: Bearer $TOKEN" \
        "$BASE/v1/events?after=$after&wait=30"); then
        echo "ehc-agent not answering: $out" >&2
        sleep 2
        continue
    fi
    # One event per line: split the answer's "events" array on its "seq"s.
    printf '%s\n' "$out" | sed 's/},{"seq"/}\n{"seq"/g; s/^{"events":\[//; s/\],"last":[0-9]*}$//' | grep '"seq"'
    after=$(printf '%s' "$out" | sed -n 's/.*"last":\([0-9]*\)}$/\1/p')
    [ -n "$after" ] || after=0
done
