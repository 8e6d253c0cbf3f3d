#!/usr/bin/env python3
"""Drive the HIL guest (see run.sh): boot it under QEMU, type codes on the
emulated USB keyboard (QMP input-send-event), write codes to the emulated
FTDI serial port (a socket chardev), unplug and replug both (device_del /
device_add), cut the power (SIGKILL to QEMU), and check what HIS received
(printed on the guest's console) and what the outbox holds after a power cut.

Standard library only. Every check prints PASS or FAIL; the exit status is the
number of failures.
"""

import argparse
import hashlib
import json
import os
import random
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time

# The simulator's built-in synthetic cards (src/sim/config.rs): name, id number.
CARDS = [
    ("测试甲", "999999199001010011"),
    ("测试乙", "999999198506150022"),
    ("测试丙", "999999201211300033"),
    ("测试丁", "999999195603080044"),
]


def static_code(i):
    name, idn = CARDS[i]
    return hashlib.sha256(f"ehc-sim-card/{i}/{name}/{idn}".encode()).hexdigest().upper() + ":1"


FAILS = 0


def check(ok, what):
    global FAILS
    print(("PASS " if ok else "FAIL ") + what, flush=True)
    if not ok:
        FAILS += 1
    return ok


def connect_unix(path, tries=100):
    """A socket QEMU listens on, once it is there (QEMU creates it as it
    starts); None if it never is."""
    for _ in range(tries):
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            return s
        except OSError:
            s.close()
            time.sleep(0.1)
    return None


class Qemu:
    """A QEMU guest on the console (stdio), with QMP, a USB keyboard and a
    USB-serial adapter whose far end is `ser.sock`. Shared with tests/vm."""

    started = []  # every QEMU process, for a driver that dies to kill

    def __init__(self, work, args):
        self.work = work
        self.qmp_path = os.path.join(work, "qmp.sock")
        self.ser_path = os.path.join(work, "ser.sock")
        for p in (self.qmp_path, self.ser_path):
            if os.path.exists(p):
                os.unlink(p)
        args = [
            # i8042=off: no PS/2 keyboard, so QMP key events go to the USB one.
            "qemu-system-x86_64", "-machine", "pc,i8042=off", "-accel", "tcg", "-cpu", "max", "-smp", "1",
            "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
            "-device", "qemu-xhci,id=xhci",
            "-chardev", f"socket,id=ser0,path={self.ser_path},server=on,wait=off",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-nic", "none",
        ] + args
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        Qemu.started.append(self.p)
        self.lines = []
        self.cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.qmp = None
        self.ser = None
        # QEMU's usb-serial is attached to the bus only while its chardev is
        # connected: connecting is plugging the adapter in.
        self.serial_connect()

    def _read(self):
        for raw in self.p.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with self.cv:
                self.lines.append(line)
                self.cv.notify_all()
        with self.cv:
            self.lines.append("<<QEMU EXITED>>")
            self.cv.notify_all()

    def wait(self, pattern, count=1, timeout=120):
        """Wait until `count` console lines match `pattern`; return the last."""
        rx = re.compile(pattern)
        deadline = time.time() + timeout
        with self.cv:
            while True:
                hits = [l for l in self.lines if rx.search(l)]
                if len(hits) >= count:
                    return hits[count - 1]
                left = deadline - time.time()
                if left <= 0 or (self.lines and self.lines[-1] == "<<QEMU EXITED>>" and rx.pattern != "<<QEMU EXITED>>"):
                    return None
                self.cv.wait(left)

    def his(self):
        with self.cv:
            out = []
            for l in self.lines:
                if l.startswith("HIS: "):
                    try:
                        out.append(json.loads(l[5:]))
                    except ValueError:
                        pass
            return out

    def qmp_cmd(self, execute, arguments=None):
        if self.qmp is None:
            self.qmp = connect_unix(self.qmp_path).makefile("rw")
            self.qmp.readline()  # greeting
            self._qmp_send({"execute": "qmp_capabilities"})
        return self._qmp_send({"execute": execute, **({"arguments": arguments} if arguments else {})})

    def _qmp_send(self, msg):
        self.qmp.write(json.dumps(msg) + "\n")
        self.qmp.flush()
        while True:
            r = json.loads(self.qmp.readline())
            if "return" in r or "error" in r:
                return r

    def device_add(self, args):
        """device_add, retried while QEMU still finishes the previous
        device_del of the same id (it completes asynchronously)."""
        for _ in range(100):
            r = self.qmp_cmd("device_add", args)
            if "error" not in r:
                return
            time.sleep(0.2)
        raise RuntimeError(f"QMP device_add {args}: {r['error']}")

    def device_del(self, dev_id):
        r = self.qmp_cmd("device_del", {"id": dev_id})
        if "error" in r:
            raise RuntimeError(f"QMP device_del {dev_id}: {r['error']}")

    def type_text(self, text):
        """Type `text` and Enter on the USB keyboard: QMP send-key, one key
        (with Shift where needed) at a time, held long enough for the guest's
        polling of the emulated keyboard to see it."""
        for ch in text + "\n":
            shift = ch.isupper() or ch == ":"
            q = {":": "semicolon", "\n": "ret"}.get(ch, ch.lower())
            keys = ([{"type": "qcode", "data": "shift"}] if shift else []) + [{"type": "qcode", "data": q}]
            r = self.qmp_cmd("send-key", {"keys": keys, "hold-time": 20})
            if "error" in r:
                raise RuntimeError(f"QMP send-key: {r['error']}")

    def serial_connect(self):
        self.ser = connect_unix(self.ser_path)

    def serial_write(self, data):
        if self.ser is None:
            self.serial_connect()
        self.ser.sendall(data)

    def serial_disconnect(self):
        if self.ser is not None:
            self.ser.close()
            self.ser = None

    def command(self, text):
        self.p.stdin.write((text + "\n").encode())
        self.p.stdin.flush()

    def kill(self):
        self.p.kill()
        self.p.wait()

    def quit(self):
        try:
            self.qmp_cmd("quit")
        except Exception:
            pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, n=40):
        with self.cv:
            return "\n".join(self.lines[-n:])


class Guest(Qemu):
    """The HIL guest: the initramfs of run.sh, in `mode`."""

    def __init__(self, a, mode, disk=None):
        args = [
            "-m", "512", "-kernel", a.kernel, "-initrd", a.initrd,
            "-append", f"console=ttyS0 quiet loglevel=3 panic=-1 ehc_mode={mode}",
            "-device", "usb-kbd,id=kbd,bus=xhci.0",
            "-device", "usb-serial,id=ser,chardev=ser0,bus=xhci.0",
        ]
        if disk:
            args += ["-drive", f"file={disk},format=raw,if=virtio,cache=none"]
        super().__init__(a.work, args)


def card_for(g, code, scanner, n=1, timeout=60):
    """Wait for HIS's n-th card with this code from this scanner."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        hits = [m for m in g.his() if m.get("type") == "card" and m.get("qrCodeText") == code and m.get("scanner") == scanner]
        if len(hits) >= n:
            return hits[n - 1]
        g.wait("^HIS: ", len(g.his()) + 1, timeout=max(0.1, deadline - time.time()))
    return None


def boot(a, mode, disk=None):
    t = time.time()
    g = Guest(a, mode, disk)
    up = g.wait("HIL: GUEST UP", timeout=180)
    if not check(up is not None, f"{mode}: guest boots ({time.time() - t:.1f} s)"):
        print(g.tail(), flush=True)
    return g


def run_evdev(a, quick):
    g = boot(a, "evdev")
    ok = g.wait(r"scanner connected scanner=kbd", timeout=60) is not None
    check(ok, "evdev: the USB keyboard's input node is grabbed")
    check(g.wait(r"scanner connected scanner=ftdi", timeout=60) is not None, "serial: the FTDI port /dev/ttyUSB0 is open")
    g.wait("HIS: .*hello", timeout=60)
    code = static_code(0)
    g.type_text(code)
    check(card_for(g, code, "kbd") is not None, "evdev: a code typed on the USB keyboard reaches HIS")
    code1 = static_code(1)
    g.serial_write((code1 + "\r").encode())
    check(card_for(g, code1, "ftdi") is not None, "serial: a code sent down the FTDI line reaches HIS")
    g.command("leak")
    leak = g.wait(r"HIL: LEAK=", timeout=30)
    check(leak is not None and leak.strip().endswith("LEAK=0"), f"evdev: keys typed while grabbed reach nobody else ({leak})")
    if not quick:
        g.device_del("kbd")
        check(g.wait(r"scanner unplugged or not present.*scanner=kbd", timeout=60) is not None, "evdev: device_del of the keyboard is seen")
        g.device_add({"driver": "usb-kbd", "id": "kbd", "bus": "xhci.0"})
        check(g.wait(r"scanner connected scanner=kbd", 2, timeout=60) is not None, "evdev: device_add: the keyboard is read again without restart")
        code2 = static_code(2)
        g.type_text(code2)
        check(card_for(g, code2, "kbd") is not None, "evdev: a code typed after the replug reaches HIS")
        g.device_del("ser")
        check(g.wait(r"scanner unplugged or not present.*scanner=ftdi", timeout=60) is not None, "serial: device_del of the FTDI adapter is seen")
        g.device_add({"driver": "usb-serial", "id": "ser", "chardev": "ser0", "bus": "xhci.0"})
        check(g.wait(r"scanner connected scanner=ftdi", 2, timeout=60) is not None, "serial: device_add: the port is reopened without restart")
        code3 = static_code(3)
        g.serial_write((code3 + "\r").encode())
        check(card_for(g, code3, "ftdi") is not None, "serial: a code sent after the replug reaches HIS")
        # The chardev's far end goes away (the adapter leaves the bus) and
        # comes back.
        g.serial_disconnect()
        check(g.wait(r"scanner unplugged or not present.*scanner=ftdi", 2, timeout=60) is not None, "serial: chardev disconnect is an unplug")
        g.serial_connect()
        check(g.wait(r"scanner connected scanner=ftdi", 3, timeout=60) is not None, "serial: chardev reconnect is a replug, read without restart")
        g.serial_write((code + "\r").encode())
        check(card_for(g, code, "ftdi") is not None, "serial: a code sent after the chardev replug reaches HIS")
    g.quit()


def run_usb_hid(a):
    g = boot(a, "usb-hid")
    check(g.wait(r"scanner connected scanner=kbd", timeout=60) is not None, "usb-hid: libusb claims the keyboard (kernel driver detached)")
    g.wait("HIS: .*hello", timeout=60)
    code = static_code(1)
    g.type_text(code)
    check(card_for(g, code, "kbd") is not None, "usb-hid: a code typed on the USB keyboard reaches HIS through libusb")
    g.device_del("kbd")
    check(g.wait(r"scanner unplugged or not present.*scanner=kbd", timeout=60) is not None, "usb-hid: device_del is seen")
    g.device_add({"driver": "usb-kbd", "id": "kbd", "bus": "xhci.0"})
    check(g.wait(r"scanner connected scanner=kbd", 2, timeout=60) is not None, "usb-hid: device_add: hotplug finds it again without restart")
    code2 = static_code(2)
    g.type_text(code2)
    check(card_for(g, code2, "kbd") is not None, "usb-hid: a code typed after the replug reaches HIS")
    g.quit()


def run_power(a, cycles):
    disk = os.path.join(a.work, "disk.img")
    subprocess.run(["truncate", "-s", "64M", disk], check=True)
    subprocess.run(["mkfs.ext4", "-F", "-q", disk], check=True)
    mnt = os.path.join(a.work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    seen_total = 0
    lost_total = 0
    for c in range(cycles):
        g = Guest(a, "power", disk)
        if g.wait(r"scanner connected scanner=ftdi", timeout=180) is None:
            check(False, f"power cycle {c}: guest up")
            print(g.tail(), flush=True)
            g.kill()
            continue
        g.wait("HIS: .*hello", timeout=60)
        k = random.randint(1, 8)
        # Stream scans without waiting; cut the power once k cards reached HIS.
        def stream():
            for i in range(40):
                try:
                    g.serial_write((static_code(i % 4) + "\r").encode())
                except OSError:
                    return
                time.sleep(0.05)
        threading.Thread(target=stream, daemon=True).start()
        g.wait(r'^HIS: .*"type":"card"', k, timeout=120)
        time.sleep(random.random() * 0.3)
        g.kill()  # the power cut: no flush, no shutdown
        cards = [m["scanId"] for m in g.his() if m.get("type") == "card"]
        v = Guest(a, "verify", disk)
        if v.wait("HIL: VERIFY DONE", timeout=180) is None:
            check(False, f"power cycle {c}: the guest boots again and mounts its disk")
            v.kill()
            continue
        v.p.wait(timeout=30)
        subprocess.run(["mount", "-o", "loop", disk, mnt], check=True)
        try:
            db = sqlite3.connect(os.path.join(mnt, "outbox.sqlite"))
            rows = {r[0] for r in db.execute("SELECT scan_id FROM rows")}
            db.close()
        finally:
            subprocess.run(["umount", mnt], check=True)
        lost = [s for s in cards if s not in rows]
        seen_total += len(cards)
        lost_total += len(lost)
        check(not lost, f"power cycle {c}: {len(cards)} card(s) HIS had, {len(lost)} without a use in the outbox ({len(rows)} rows in all)")
    print(f"power cuts: {cycles} cycles, {seen_total} uses HIS had received, {lost_total} lost", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--agent", required=True)
    ap.add_argument("--mode", default="full")
    a = ap.parse_args()
    t0 = time.time()
    if a.mode == "quick":
        run_evdev(a, quick=True)
    elif a.mode == "devices":
        run_evdev(a, quick=False)
        run_usb_hid(a)
    else:
        run_evdev(a, quick=False)
        run_usb_hid(a)
        run_power(a, int(os.environ.get("HIL_POWER_CYCLES", "20")))
    print(f"HIL done in {time.time() - t0:.0f} s: {FAILS} failure(s)", flush=True)
    sys.exit(min(FAILS, 100))


if __name__ == "__main__":
    main()
