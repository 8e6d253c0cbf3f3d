#!/usr/bin/env bash
# The Debian package installed as hospital IT installs it, under a real
# systemd (Debian bookworm as a QEMU guest), and exercised.
#
#   tests/vm/run.sh quick    # install, start, a code through each scanner kind,
#                            # a scanner plugged after start, reload (what CI runs)
#   tests/vm/run.sh          # and: replug, watchdog restart, the journal free of
#                            # patients' data, upgrade keeping the edited config, purge
#
# The guest: Debian's systemd, udev, dbus, python3 from mmdebstrap into an
# ext4 image (mkfs.ext4 -d, no loop mount), Debian's kernel, and a busybox
# initramfs that loads virtio and ext4 and switches to systemd. QEMU with
# software emulation (no KVM needed), a USB keyboard and an FTDI serial
# adapter on fixed xHCI ports, QMP to type and to plug, and a second serial
# port on which tests/vm/vm-control runs the driver's shell commands. Needs
# root (apt-get, mmdebstrap) and Debian's archive (a proxy or mirror works:
# mmdebstrap uses the host's apt sources). Every check prints PASS or FAIL.
#
# Exit status: the number of failed checks; 77 when the guest could not be
# set up (packages, the kernel, mmdebstrap), which .ci/run reports apart.
set -Eeuo pipefail
trap 'echo "tests/vm: setup failed at line $LINENO" >&2; exit 77' ERR
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=${VM_WORK:-/tmp/ehc-vm}
mode=${1:-full}
mkdir -p "$work"
export PATH=$PATH:/sbin:/usr/sbin

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v depmod >/dev/null || need+=(kmod)
command -v cpio >/dev/null || need+=(cpio)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

. "$here/../lib/guest-kernel.sh"
guest_kernel "$work"

# The package, and a newer build of it for the upgrade.
t=$(date +%s)
(cd "$root" && { command -v cargo-deb >/dev/null || cargo install cargo-deb --locked; } && cargo deb)
version=$(cd "$root" && cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["packages"][0]["version"])')
old=$(ls -t "$root"/target/debian/ehc-agent_"$version"*_amd64.deb | head -1)
rm -rf "$work/debs" && mkdir -p "$work/debs"
cp "$old" "$work/debs/old.deb"
(cd "$root" && cargo deb --no-build --deb-version "$version+vmtest1" -o "$work/debs/new.deb" >/dev/null)
echo "packages: $(basename "$old") and $version+vmtest1 ($(( $(date +%s) - t )) s)"

# Debian with systemd, once per package list (then reused from the tarball).
t=$(date +%s)
include=systemd,systemd-sysv,udev,dbus,kmod,python3,procps,iproute2
if [ ! -s "$work/base.tar" ] || [ "$(cat "$work/base.include" 2>/dev/null)" != "$include" ]; then
    mmdebstrap --quiet --format=tar --variant=apt --include="$include" bookworm "$work/base.tar.part"
    mv "$work/base.tar.part" "$work/base.tar"
    echo "$include" > "$work/base.include"
fi
r="$work/root"
rm -rf "$r" && mkdir -p "$r"
tar -C "$r" -xf "$work/base.tar"
# The kernel's modules that this machine needs (USB, HID, input, serial, the disk).
for d in drivers/usb drivers/hid drivers/input drivers/virtio drivers/block fs/ext4 fs/jbd2 fs/mbcache.ko lib crypto; do
    [ -e "$moddir/kernel/$d" ] || continue
    mkdir -p "$r/lib/modules/$kver/kernel/$(dirname "$d")"
    cp -a "$moddir/kernel/$d" "$r/lib/modules/$kver/kernel/$d"
done
cp "$moddir"/modules.{builtin,builtin.modinfo,order} "$r/lib/modules/$kver/" 2>/dev/null || true
depmod -b "$r" "$kver"
echo "/dev/vda / ext4 rw,errors=remount-ro 0 1" > "$r/etc/fstab"
echo ehc-vm > "$r/etc/hostname"
# What the site's IT adds for its own scanners (QEMU's keyboard and FTDI
# adapter here), the way 60-ehc-agent.rules says to. In place before the
# package is installed, as on a machine re-imaged with the site's files.
cat > "$r/etc/udev/rules.d/59-ehc-agent-local.rules" <<'RULES'
SUBSYSTEMS=="usb", ATTRS{idVendor}=="0627", ENV{EHC_SCANNER}="1"
SUBSYSTEMS=="usb", ATTRS{idVendor}=="0403", ENV{EHC_SCANNER}="1"
RULES
install -D -m 755 "$here/vm-control" "$r/usr/local/sbin/vm-control"
install -D -m 644 "$here/vm-control.service" "$r/etc/systemd/system/vm-control.service"
mkdir -p "$r/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/vm-control.service "$r/etc/systemd/system/multi-user.target.wants/vm-control.service"
cp -r "$work/debs" "$r/root/debs"
rm -f "$work/disk.img"
truncate -s 3G "$work/disk.img"
mkfs.ext4 -q -F -L root -d "$r" "$work/disk.img"
rm -rf "$r"

# The initramfs: busybox, virtio and ext4, /init.
rd="$work/initramfs"
rm -rf "$rd" && mkdir -p "$rd"/{bin,lib/modules,dev,proc,sys}
cp /bin/busybox "$rd/bin/busybox"
: > "$rd/modules.order"
for rel in $(guest_modules "$moddir" virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk crc16 mbcache jbd2 crc32c_generic libcrc32c ext4); do
    cp "$moddir/$rel" "$rd/lib/modules/$(basename "$rel")"
    basename "$rel" >> "$rd/modules.order"
done
install -m 755 "$here/init" "$rd/init"
(cd "$rd" && find . | cpio -o -H newc --quiet | gzip -1 > "$work/initrd.gz")
echo "guest image: $(du -h --apparent-size "$work/disk.img" | cut -f1) sparse, $(du -h "$work/disk.img" | cut -f1) used, kernel $kver ($(( $(date +%s) - t )) s)"

[ -n "${VM_BUILD_ONLY:-}" ] && exit 0
trap - ERR
exec python3 "$here/driver.py" --work "$work" --kernel "$kernel" --initrd "$work/initrd.gz" --disk "$work/disk.img" --mode "$mode"
