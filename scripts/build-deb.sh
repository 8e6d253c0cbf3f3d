#!/usr/bin/env bash
# Build the Debian package and check what is in it.
#   scripts/build-deb.sh            -> target/debian/ehc-agent_<version>_<arch>.deb
# Installs cargo-deb from crates.io when missing (a few minutes, once).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
cargo deb
deb=$(ls -t target/debian/ehc-agent_*.deb | head -1)
echo "built $deb"
contents=$(dpkg-deb -c "$deb")
conffiles=$(dpkg-deb -I "$deb" conffiles || true)
missing=0
for f in ./usr/bin/ehc-agent ./usr/lib/systemd/system/ehc-agent.service ./usr/lib/systemd/system/ehc-agent-gateway.service \
         ./usr/lib/sysusers.d/ehc-agent.conf ./etc/ehc-agent/gateway.toml ./usr/share/doc/ehc-agent/gateway.md \
         ./usr/lib/udev/rules.d/60-ehc-agent.rules ./etc/ehc-agent/agent.toml ./usr/share/doc/ehc-agent/operations.md; do
    if ! grep -q " $f\$" <<<"$contents"; then echo "MISSING from the package: $f"; missing=1; fi
done
for c in agent.toml gateway.toml; do
    grep -qx "/etc/ehc-agent/$c" <<<"$conffiles" || { echo "$c is not a conffile"; missing=1; }
done
for s in postinst postrm; do
    dpkg-deb -I "$deb" "$s" >/dev/null 2>&1 || { echo "no $s script"; missing=1; }
done
[ "$missing" = 0 ] && echo "package contents OK"
exit "$missing"
