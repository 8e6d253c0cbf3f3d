#!/usr/bin/env bash
# Hardware in the loop: the agent on a real Linux USB stack under QEMU.
#
#   tests/hil/run.sh            # every check: evdev, usb-hid, serial, unplug/replug, power cuts (N=20)
#   tests/hil/run.sh quick      # one boot: evdev + serial typing (what CI runs)
#   tests/hil/run.sh devices    # every device check, no power cuts
#   HIL_POWER_CYCLES=50 tests/hil/run.sh
#
# Builds a tiny guest from Debian's packages (qemu-system-x86, the
# linux-image-amd64 kernel unpacked with dpkg-deb, busybox-static), with the
# agent's release binary and the libraries it links in a cpio initramfs, and
# boots it with software emulation (-accel tcg: no KVM needed). The Python
# driver (standard library only) types on the emulated USB keyboard through
# QMP, writes to the emulated FTDI serial port through a socket chardev,
# unplugs and replugs both with device_del/device_add, and kills QEMU without
# warning to cut the power. Needs root for apt-get and for loop-mounting the
# guest's disk after a power cut.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=${HIL_WORK:-/tmp/ehc-hil}
mode=${1:-full}
mkdir -p "$work"

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v depmod >/dev/null || [ -x /sbin/depmod ] || need+=(kmod)
command -v cpio >/dev/null || need+=(cpio)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

. "$here/../lib/guest-kernel.sh"
guest_kernel "$work"

(cd "$root" && cargo build --release)
agent="$root/target/release/ehc-agent"

# The initramfs.
rd="$work/rootfs"
rm -rf "$rd"
mkdir -p "$rd"/{bin,lib/modules,etc/ehc,dev,proc,sys}
cp /bin/busybox "$rd/bin/busybox"
cp "$agent" "$rd/bin/ehc-agent"
# The agent's shared libraries, at the paths the loader expects.
for lib in $(ldd "$agent" | awk '/=> \//{print $3} /^\t\/lib/{print $1}'); do
    mkdir -p "$rd$(dirname "$lib")"
    cp -L "$lib" "$rd$lib"
done
# Modules and their dependencies, in load order (modules.dep lists deps).
want="usb-common usbcore xhci-hcd xhci-pci hid usbhid hid-generic evdev usbserial ftdi_sio virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk crc16 mbcache jbd2 crc32c_generic libcrc32c ext4"
: > "$rd/modules.order"
for rel in $(guest_modules "$moddir" $want); do
    cp "$moddir/$rel" "$rd/lib/modules/$(basename "$rel")"
    basename "$rel" >> "$rd/modules.order"
done
cp "$here/init" "$rd/init"
chmod 755 "$rd/init"
scanner_kbd_evdev='[[scanner]]
name = "kbd"
kind = "evdev"
path = "/dev/input/usbkbd"
debounce_ms = 0'
scanner_kbd_usb='[[scanner]]
name = "kbd"
kind = "usb-hid"
vendor_id = 0x0627
product_id = 0x0001
debounce_ms = 0'
scanner_serial='[[scanner]]
name = "ftdi"
kind = "serial"
path = "/dev/ttyUSB0"
baud = 9600
terminator = "cr"
debounce_ms = 0'
{ cat "$here/agent.toml.in"; echo; echo "$scanner_kbd_evdev"; echo; echo "$scanner_serial"; } > "$rd/etc/ehc/agent-evdev.toml"
{ cat "$here/agent.toml.in"; echo; echo "$scanner_kbd_usb"; echo; echo "$scanner_serial"; } > "$rd/etc/ehc/agent-usb-hid.toml"
{ cat "$here/agent.toml.in"; echo; echo "$scanner_serial"; } > "$rd/etc/ehc/agent-power.toml"
(cd "$rd" && find . | cpio -o -H newc --quiet | gzip -1 > "$work/initrd.gz")
echo "initramfs: $(du -h "$work/initrd.gz" | cut -f1), $(wc -l < "$rd/modules.order") modules, kernel $kver"

[ -n "${HIL_BUILD_ONLY:-}" ] && exit 0
exec python3 "$here/driver.py" --work "$work" --kernel "$kernel" --initrd "$work/initrd.gz" --mode "$mode" --agent "$agent"
