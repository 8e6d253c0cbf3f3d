#!/usr/bin/env python3
"""Drive the systemd guest (see run.sh) through what hospital IT does with
the package: install it with apt, write the configuration, enable the
service, connect an HIS client in the ehc-his group, scan, plug a scanner in
after start, reload, and (full run) replug, let the watchdog restart a wedged
agent, read the journal for patients' data, upgrade, purge.

Commands run in the guest through tests/vm/vm-control on the second serial
port; keys are typed and adapters plugged through QMP (tests/hil's Qemu).
Standard library only. Every check prints PASS or FAIL; the exit status is
the number of failures.
"""

import argparse
import base64
import json
import os
import re
import shlex
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "hil"))
import driver as hil  # noqa: E402
from driver import CARDS, check, static_code  # noqa: E402

KBD = {"driver": "usb-kbd", "id": "kbd", "bus": "xhci.0", "port": "1"}
# QEMU puts the port in the adapter's USB serial number: a fixed port keeps
# its /dev/serial/by-id name from one plug to the next.
SER = {"driver": "usb-serial", "id": "ser", "chardev": "ser0", "bus": "xhci.0", "port": "2"}
SIM_SECRET = "ehc-sim-secret-not-for-production"
SIM_APP_ID = "ehcsimapp0000000000000000000000001"


class VM(hil.Qemu):
    def __init__(self, a):
        self.ctl_path = os.path.join(a.work, "ctl.sock")
        if os.path.exists(self.ctl_path):
            os.unlink(self.ctl_path)
        super().__init__(a.work, [
            "-m", "1024", "-kernel", a.kernel, "-initrd", a.initrd,
            "-append", "console=ttyS0 panic=-1 loglevel=3 systemd.show_status=false",
            "-drive", f"file={a.disk},format=raw,if=virtio,cache=unsafe",
            "-chardev", f"socket,id=ctl,path={self.ctl_path},server=on,wait=off",
            "-serial", "chardev:ctl",
            "-device", "usb-kbd," + ",".join(f"{k}={v}" for k, v in KBD.items() if k != "driver"),
        ])
        self.ctl = None
        self.ctl_buf = b""
        self.next_id = 0


    def _ctl_read(self, want_id, deadline):
        while True:
            while b"\n" in self.ctl_buf:
                line, self.ctl_buf = self.ctl_buf.split(b"\n", 1)
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                # Before vm-control made the port raw, the tty echoed what
                # the host sent: requests coming back are not answers.
                if msg.get("id") == want_id and "rc" in msg:
                    return msg
            left = deadline - time.time()
            if left <= 0:
                return None
            self.ctl.settimeout(left)
            try:
                chunk = self.ctl.recv(65536)
            except socket.timeout:
                return None
            if not chunk:
                return None
            self.ctl_buf += chunk

    def _send(self, cmd, timeout):
        self.next_id += 1
        self.ctl.sendall((json.dumps({"id": self.next_id, "sh": cmd, "timeout": timeout}) + "\n").encode())
        return self.next_id

    def up(self, timeout=300):
        """Wait for the control channel: the guest has booted systemd far
        enough to start vm-control. Asks again every few seconds, since what
        was sent before the service opened the port is lost."""
        self.ctl = hil.connect_unix(self.ctl_path)
        if self.ctl is None:
            raise RuntimeError("cannot connect to the control channel")
        deadline = time.time() + timeout
        while time.time() < deadline:
            i = self._send("true", 10)
            if self._ctl_read(i, min(deadline, time.time() + 3)) is not None:
                return True
        return False

    def sh(self, cmd, timeout=120):
        """Run `cmd` with bash in the guest: (exit status, output)."""
        i = self._send(cmd, timeout)
        r = self._ctl_read(i, time.time() + timeout + 10)
        if r is None:
            return (-1, "no answer on the control channel")
        return (r["rc"], r["out"])

    def until(self, cmd, timeout=60):
        """Run `cmd` in the guest until it succeeds (a condition, polled
        there): its output, or None when it never did."""
        q = shlex.quote(cmd)
        rc, out = self.sh(f"for i in $(seq {timeout * 5}); do if out=$(bash -c {q} 2>/dev/null); then echo \"$out\"; exit 0; fi; sleep 0.2; done; exit 1", timeout + 10)
        return out.strip() if rc == 0 else None


def his_cards(vm, code):
    rc, out = vm.sh("cat /var/log/his.log 2>/dev/null")
    cards = []
    for l in out.splitlines():
        try:
            m = json.loads(l)
        except ValueError:
            continue
        if m.get("type") == "card" and m.get("qrCodeText") == code:
            cards.append(m)
    return cards


def card_reaches_his(vm, code, scanner, timeout=60):
    """Wait for a verified card with this code from this scanner in the HIS
    client's log (the condition polled in the guest, no fixed sleep)."""
    q = shlex.quote(code)
    ok = vm.until(f"grep -F {q} /var/log/his.log | grep -q '\"scanner\": \"{scanner}\"' && echo yes", timeout)
    if ok is None:
        return None
    hits = [c for c in his_cards(vm, code) if c.get("scanner") == scanner]
    return hits[-1] if hits else None


def journal_has(vm, pattern, scanner=None, count=1, timeout=60):
    """Wait for `count` of the agent's journal messages matching `pattern`
    (about `scanner`: its F_SCANNER field, as docs/operations.md shows)."""
    q = shlex.quote(pattern)
    field = f" F_SCANNER={scanner}" if scanner else ""
    return vm.until(f"test $(journalctl -u ehc-agent{field} -o cat --no-pager | grep -cE {q}) -ge {count} && echo y", timeout) is not None


def main_pid(vm):
    return vm.sh("systemctl show -p MainPID --value ehc-agent")[1].strip()


def agent_config(kbd_path, ser_path, terminal="VM-1"):
    return f"""# Edited by hospital IT (tests/vm).
[platform]
base_url = "http://127.0.0.1:8900"
app_id = "{SIM_APP_ID}"
app_secret_file = "/etc/ehc-agent/app_secret"
hospital_id = "10086"

[terminal]
id = "{terminal}"
department = "内科"
city_code = "110000"
city_name = "北京市"
hospital_code = "01"
hospital_name = "测试医院"

[[scanner]]
name = "kbd"
kind = "evdev"
path = "{kbd_path}"
debounce_ms = 0

[[scanner]]
name = "ftdi"
kind = "serial"
path = "{ser_path}"
baud = 9600
terminator = "cr"
debounce_ms = 0

[his]
listen_unix = "/run/ehc-agent/his.sock"
socket_group = "ehc-his"

[outbox]
path = "/var/lib/ehc-agent/outbox.sqlite"
"""


def write_file(vm, path, text, mode="644"):
    b = base64.b64encode(text.encode()).decode()
    return vm.sh(f"echo {b} | base64 -d > {path}.new && chmod {mode} {path}.new && mv {path}.new {path}")[0] == 0


def run(a, quick):
    t0 = time.time()
    vm = VM(a)
    up = vm.up()
    if not check(up, f"boot: systemd in the guest runs the control channel ({time.time() - t0:.0f} s)"):
        print(vm.tail(60), flush=True)
        return vm
    state = vm.sh("systemctl is-system-running --wait", 180)[1].strip()
    check(state in ("running", "degraded"), f"boot: the system reaches multi-user ({state}, {time.time() - t0:.0f} s)")

    # The adapter's stable name, then unplugged and its driver unloaded: the
    # agent will start with no USB-serial driver in the kernel, and the
    # adapter is plugged in after it (the late-plug case).
    vm.device_add(SER)
    ser_path = vm.until("ls /dev/serial/by-id/*-if00-port0")
    check(ser_path is not None, f"the FTDI adapter appears under /dev/serial/by-id ({ser_path})")
    vm.device_del("ser")
    vm.until("test ! -e /dev/ttyUSB0 && echo gone")
    vm.sh("modprobe -r ftdi_sio usbserial")
    check(vm.sh("grep -w ttyUSB /proc/devices")[0] != 0, "late plug set up: no USB-serial driver in the kernel before the agent starts")
    kbd_path = vm.until("ls /dev/input/by-id/*QEMU_USB_Keyboard*-event-kbd")
    check(kbd_path is not None, f"the USB keyboard appears under /dev/input/by-id ({kbd_path})")

    # apt install, as IT does.
    t = time.time()
    rc, out = vm.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y /root/debs/old.deb", 300)
    if not check(rc == 0, f"install: apt-get install ./ehc-agent.deb ({time.time() - t:.0f} s)"):
        print(out[-3000:], flush=True)
    check(vm.sh("getent passwd ehc-agent && getent group ehc-his")[0] == 0, "install: the ehc-agent user and the ehc-his group exist")
    grp = vm.sh(f"stat -L -c %G {kbd_path}")[1].strip()
    check(grp == "ehc-agent", f"install: a scanner plugged in before the install is the agent's (group {grp})")
    rc, out = vm.sh("journalctl -b -u systemd-udevd -o cat --no-pager | grep -i 'unknown group'")
    check(rc != 0, "install: udev never met an unknown group (users before rules)" + ("" if rc else f": {out.strip()}"))
    check(vm.sh("systemctl is-enabled ehc-agent")[1].strip() == "disabled", "install: the service waits for its configuration (not enabled)")

    # The configuration, the secret, and the platform (the simulator).
    write_file(vm, "/etc/ehc-agent/agent.toml", agent_config(kbd_path, ser_path))
    vm.sh(f"printf %s {SIM_SECRET} > /etc/ehc-agent/app_secret")
    rc, out = vm.sh("systemd-run --unit=ehc-sim --property=Type=exec /usr/bin/ehc-agent sim --listen 127.0.0.1:8900")
    check(rc == 0 and vm.until("bash -c 'echo > /dev/tcp/127.0.0.1/8900' && echo up") is not None, "the simulator runs in the guest")
    rc, out = vm.sh("ehc-agent check --config /etc/ehc-agent/agent.toml")
    check(rc == 0, "configure: `ehc-agent check` accepts IT's configuration" + ("" if rc == 0 else f": {out}"))
    # The HIS application: its own account, in the ehc-his group, the shipped example client.
    vm.sh("useradd --system --groups ehc-his his-app")
    vm.sh("systemd-run --unit=his-client --uid=his-app --property=StandardOutput=append:/var/log/his.log "
          "--property=StandardError=append:/var/log/his.err "
          "/usr/bin/python3 -u /usr/share/doc/ehc-agent/examples/his-client.py --unix /run/ehc-agent/his.sock")

    t = time.time()
    rc, out = vm.sh("systemctl enable --now ehc-agent", 120)
    if not check(rc == 0 and vm.sh("systemctl is-active ehc-agent")[1].strip() == "active",
                 f"start: systemctl enable --now: active once it said READY ({time.time() - t:.1f} s)"):
        print(vm.sh("systemctl status ehc-agent --no-pager; journalctl -u ehc-agent --no-pager | tail -30")[1], flush=True)
        return vm  # everything after this needs the agent running
    out = vm.sh("systemd-analyze security ehc-agent --no-pager | tail -1")[1]
    m = re.search(r"exposure level for ehc-agent.service: ([0-9.]+)", out)
    check(m is not None and float(m.group(1)) <= 2.5, f"start: systemd-analyze security exposure at most 2.5 ({out.strip()})")
    sock = vm.sh("stat -c '%G %a' /run/ehc-agent/his.sock")[1].strip()
    check(sock == "ehc-his 660", f"start: his.sock is the ehc-his group's ({sock})")
    check(vm.until("grep -q hello /var/log/his.log && echo yes") is not None, "HIS: the client in group ehc-his is connected")

    # A code through each scanner kind.
    check(journal_has(vm, "scanner connected", "kbd"), "evdev: the keyboard is grabbed")
    code = static_code(0)
    vm.type_text(code)
    c = card_reaches_his(vm, code, "kbd")
    check(c is not None and c.get("verified") is True, "evdev: a code typed on the USB keyboard reaches HIS, verified")

    # Plugged after start: the driver was loaded for the unit before it
    # started (modprobe@usbserial), so DeviceAllow=char-ttyUSB resolved.
    vm.device_add(SER)
    check(journal_has(vm, "scanner connected", "ftdi"), "late plug: the FTDI adapter plugged after start is opened")
    code = static_code(1)
    vm.serial_write((code + "\r").encode())
    c = card_reaches_his(vm, code, "ftdi")
    check(c is not None and c.get("verified") is True, "late plug: a code sent down the FTDI line reaches HIS, verified")
    rc, out = vm.sh("journalctl -u ehc-agent -o cat --no-pager | grep -i 'not permitted'")
    check(rc != 0, "late plug: no 'Operation not permitted'" + ("" if rc else f": {out.strip()}"))

    # Reload: a good configuration in place, a broken one refused.
    pid = main_pid(vm)
    hellos = vm.sh("grep -c hello /var/log/his.log")[1].strip()
    write_file(vm, "/etc/ehc-agent/agent.toml", agent_config(kbd_path, ser_path, terminal="VM-2"))
    rc, _ = vm.sh("systemctl reload ehc-agent")
    check(rc == 0 and journal_has(vm, "configuration reloaded"), "reload: a good configuration is taken in place")
    check(main_pid(vm) == pid, "reload: same process")
    code = static_code(2)
    vm.type_text(code)
    c = card_reaches_his(vm, code, "kbd")
    check(c is not None, "reload: a code typed after the reload reaches HIS")
    check(vm.sh("grep -c hello /var/log/his.log")[1].strip() == hellos, "reload: the HIS client was not disconnected")
    write_file(vm, "/etc/ehc-agent/agent.toml", "[platform\nbroken = \n")
    vm.sh("systemctl reload ehc-agent")
    check(journal_has(vm, "configuration NOT reloaded"), "reload: a broken configuration is refused and said so in the journal")
    check(vm.sh("systemctl is-active ehc-agent")[1].strip() == "active" and main_pid(vm) == pid, "reload: after a broken configuration the agent runs on, same process")
    code = static_code(3)
    vm.serial_write((code + "\r").encode())
    check(card_reaches_his(vm, code, "ftdi") is not None, "reload: scans still reach HIS after the broken configuration")
    write_file(vm, "/etc/ehc-agent/agent.toml", agent_config(kbd_path, ser_path, terminal="VM-2"))
    vm.sh("systemctl reload ehc-agent")
    if quick:
        return vm

    # Replug both scanners.
    vm.device_del("kbd")
    check(journal_has(vm, "scanner unplugged or not present", "kbd"), "replug: the keyboard's removal is seen")
    vm.device_add(KBD)
    check(journal_has(vm, "scanner connected", "kbd", count=2), "replug: the keyboard is read again without restart")
    code = static_code(0)
    n = len([c for c in his_cards(vm, code) if c.get("scanner") == "kbd"])
    vm.type_text(code)
    check(vm.until(f"test $(grep -F {code} /var/log/his.log | grep -c '\"scanner\": \"kbd\"') -gt {n} && echo y") is not None,
          "replug: a code typed after the replug reaches HIS")

    # The watchdog: a wedged agent (SIGSTOP) is killed and started again.
    pid = main_pid(vm)
    vm.sh(f"kill -STOP {pid}")
    t = time.time()
    new = vm.until(f"p=$(systemctl show -p MainPID --value ehc-agent); test \"$p\" != {pid} && test \"$p\" != 0 && systemctl is-active -q ehc-agent && echo $p", 120)
    check(new is not None, f"watchdog: a wedged agent is restarted ({time.time() - t:.0f} s, WatchdogSec=30s)")
    check(vm.sh("journalctl -u ehc-agent --no-pager | grep -qi 'watchdog timeout'")[0] == 0, "watchdog: the journal says why")
    code = static_code(1)
    n = len(his_cards(vm, code))
    vm.serial_write((code + "\r").encode())
    check(vm.until(f"test $(grep -cF {code} /var/log/his.log) -gt {n} && echo y", 90) is not None,
          "watchdog: after the restart, scans reach HIS again (the client reconnected)")

    # Patients' data never reaches the journal.
    rc, out = vm.sh("journalctl -b -o export --no-pager | wc -c")
    words = [n for n, _ in CARDS] + [i for _, i in CARDS] + [static_code(i) for i in range(4)]
    pats = "\n".join(words)
    write_file(vm, "/root/pii.txt", pats + "\n")
    # Every entry of the boot, every field, but the simulator's: it plays
    # the platform and prints its synthetic cards' codes at start by design.
    where = vm.sh("journalctl -b -o json --no-pager | python3 -c '"
                  "import json,sys\n"
                  "w=[l.strip() for l in open(\"/root/pii.txt\") if l.strip()]\n"
                  "for l in sys.stdin:\n"
                  " e=json.loads(l)\n"
                  " if e.get(\"_SYSTEMD_UNIT\")==\"ehc-sim.service\": continue\n"
                  " for k,v in e.items():\n"
                  "  if isinstance(v,str) and any(x in v for x in w): print(e.get(\"_SYSTEMD_UNIT\"),e.get(\"SYSLOG_IDENTIFIER\"),k,v[:160])\n"
                  "' | sort | uniq -c | head -20")[1].strip()
    check(where == "", f"journal: no name, ID number or full QR text outside the simulator in {out.strip()} bytes of journal" + (f":\n{where}" if where else ""))

    # Upgrade: the edited configuration stays, the new binary runs.
    t = time.time()
    rc, out = vm.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y /root/debs/new.deb", 300)
    check(rc == 0 and "+vmtest1" in vm.sh("dpkg-query -W -f '${Version}' ehc-agent")[1], f"upgrade: apt-get install of the newer package ({time.time() - t:.0f} s)")
    check(vm.sh("grep -q 'terminal\\|VM-2' /etc/ehc-agent/agent.toml && grep -q 'id = \"VM-2\"' /etc/ehc-agent/agent.toml")[0] == 0,
          "upgrade: IT's edited agent.toml is kept")
    check(vm.sh("test -s /etc/ehc-agent/app_secret")[0] == 0, "upgrade: the secret is kept")
    exe = vm.sh("ls -l /proc/$(systemctl show -p MainPID --value ehc-agent)/exe")[1]
    check(vm.sh("systemctl is-active ehc-agent")[1].strip() == "active" and "(deleted)" not in exe,
          "upgrade: the service runs the new binary")
    code = static_code(2)
    n = len(his_cards(vm, code))
    vm.type_text(code)
    check(vm.until(f"test $(grep -cF {code} /var/log/his.log) -gt {n} && echo y", 90) is not None, "upgrade: scans reach HIS")

    # Purge.
    rc, out = vm.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y ehc-agent", 300)
    check(rc == 0, "purge: apt-get purge")
    left = vm.sh("ls -d /etc/ehc-agent /var/lib/ehc-agent /usr/lib/systemd/system/ehc-agent.service /run/ehc-agent 2>/dev/null")[1].split()
    check(left == [], f"purge: nothing of the agent is left ({left})")
    check(vm.sh("systemctl is-active ehc-agent")[1].strip() != "active", "purge: the agent is stopped")
    return vm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--disk", required=True)
    ap.add_argument("--mode", default="full")
    a = ap.parse_args()
    t0 = time.time()
    vm = None
    try:
        vm = run(a, quick=a.mode == "quick")
    finally:
        # A driver that dies must not leave a guest spinning a core.
        if vm is None or sys.exc_info()[0] is not None:
            for p in list(hil.Qemu.started):
                p.kill()
    if hil.FAILS:
        print("---- guest console (last lines) ----", flush=True)
        print(vm.tail(40), flush=True)
        print(vm.sh("journalctl -u ehc-agent --no-pager | tail -40")[1], flush=True)
    vm.sh("systemctl poweroff", 5)
    vm.quit()
    print(f"VM {a.mode} done in {time.time() - t0:.0f} s: {hil.FAILS} failure(s)", flush=True)
    sys.exit(min(hil.FAILS, 76))  # 77: setup failed (run.sh)


if __name__ == "__main__":
    main()
