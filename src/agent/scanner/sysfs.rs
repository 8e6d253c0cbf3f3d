//! Finding scanners through sysfs: USB devices, their interfaces, and the
//! device nodes the kernel made for them (hidraw, input event, tty), plus
//! the stable `/dev/serial/by-id` and `/dev/input/by-id` names.
//!
//! sysfs is readable without root, so `ehc-agent scanners` works for any
//! user; what it cannot read (a HID report descriptor, usually root-only) it
//! says so instead of guessing.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// USB vendors whose devices are very likely scanners.
pub const SCANNER_VENDORS: &[(u16, &str)] = &[
    (0x1eab, "Newland"),
    (0x0c2e, "Honeywell/Metrologic"),
    (0x05e0, "Zebra/Symbol"),
    (0x05f9, "Datalogic"),
];

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsbDevice {
    pub sysfs: String,
    pub vendor_id: u16,
    pub product_id: u16,
    pub manufacturer: Option<String>,
    pub product: Option<String>,
    pub serial: Option<String>,
    pub known_scanner_vendor: Option<&'static str>,
    pub interfaces: Vec<Interface>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub number: String,
    pub class: u8,
    pub subclass: u8,
    pub protocol: u8,
    /// `HID keyboard`, `HID POS`, `CDC ACM`, ...
    pub kind: String,
    /// Device nodes: `/dev/hidraw0`, `/dev/input/event5`, `/dev/ttyACM0`.
    pub nodes: Vec<String>,
    /// Stable names pointing at those nodes.
    pub by_id: Vec<String>,
    /// What could not be read, said plainly.
    pub notes: Vec<String>,
}

fn read(p: &Path) -> Option<String> {
    fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn hex(p: &Path) -> Option<u16> {
    u16::from_str_radix(&read(p)?, 16).ok()
}

/// `/dev/...` node → the by-id names that point at it.
fn by_id_links() -> BTreeMap<PathBuf, Vec<String>> {
    let mut m: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for dir in ["/dev/serial/by-id", "/dev/input/by-id"] {
        let Ok(rd) = fs::read_dir(dir) else { continue };
        for e in rd.flatten() {
            if let Ok(target) = fs::canonicalize(e.path()) {
                m.entry(target)
                    .or_default()
                    .push(e.path().display().to_string());
            }
        }
    }
    m
}

/// Device nodes below an interface's sysfs directory.
fn nodes(iface: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![iface.to_owned()];
    let mut seen = 0;
    while let Some(d) = stack.pop() {
        seen += 1;
        if seen > 200 {
            break; // sysfs loops back through symlinks; stay shallow
        }
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ft = e.file_type();
            let is_dir = ft.as_ref().map(|t| t.is_dir()).unwrap_or(false);
            if name.starts_with("hidraw")
                && name.len() > 6
                && name[6..].chars().all(|c| c.is_ascii_digit())
                || name.starts_with("event")
                    && name[5..].chars().all(|c| c.is_ascii_digit())
                    && !name[5..].is_empty()
                || (name.starts_with("ttyUSB") || name.starts_with("ttyACM"))
                    && name[6..].chars().all(|c| c.is_ascii_digit())
            {
                let node = if name.starts_with("event") {
                    format!("/dev/input/{name}")
                } else {
                    format!("/dev/{name}")
                };
                if !out.contains(&node) {
                    out.push(node);
                }
            }
            if is_dir
                && (matches!(name.as_str(), "hidraw" | "tty")
                    || name.starts_with("input")
                    || name.starts_with("0003:"))
            {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// Is this hidraw node a HID POS barcode scanner (usage page 0x8C)?
/// `None`: its report descriptor could not be read (root only on most systems).
pub fn is_hid_pos(hidraw: &str) -> Option<bool> {
    let d = fs::read(format!(
        "/sys/class/hidraw/{hidraw}/device/report_descriptor"
    ))
    .ok()?;
    // Usage Page item (0x05 one-byte or 0x06 two-byte) with value 0x8C.
    Some(d.windows(2).any(|w| w == [0x05, 0x8C]) || d.windows(3).any(|w| w == [0x06, 0x8C, 0x00]))
}

fn kind_of(class: u8, subclass: u8, protocol: u8, nodes: &[String]) -> (String, Vec<String>) {
    let mut notes = Vec::new();
    let kind = match (class, subclass, protocol) {
        (3, 1, 1) => "HID keyboard".to_owned(),
        (3, _, _) => {
            let raw = nodes
                .iter()
                .find_map(|n| n.strip_prefix("/dev/").filter(|n| n.starts_with("hidraw")));
            match raw.map(is_hid_pos) {
                Some(Some(true)) => "HID POS".to_owned(),
                Some(Some(false)) => "HID".to_owned(),
                Some(None) => {
                    notes.push("report descriptor not readable (run as root to tell HID POS from other HID)".into());
                    "HID".to_owned()
                }
                None => "HID".to_owned(),
            }
        }
        (2, _, _) | (10, _, _) => "CDC ACM (serial)".to_owned(),
        (0xff, _, _) => "vendor-specific".to_owned(),
        (9, _, _) => "hub".to_owned(),
        _ => format!("class {class:#04x}"),
    };
    (kind, notes)
}

/// Every attached USB device (hubs excluded), with interfaces and nodes.
pub fn usb_devices() -> Vec<UsbDevice> {
    let links = by_id_links();
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/sys/bus/usb/devices") else {
        return out;
    };
    let mut entries: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    entries.sort();
    for dev in &entries {
        let (Some(vendor_id), Some(product_id)) =
            (hex(&dev.join("idVendor")), hex(&dev.join("idProduct")))
        else {
            continue;
        };
        if read(&dev.join("bDeviceClass")).as_deref() == Some("09") {
            continue;
        }
        let name = dev
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut interfaces = Vec::new();
        for iface in entries.iter().filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{name}:")))
        }) {
            let byte = |f: &str| {
                read(&iface.join(f))
                    .and_then(|s| u8::from_str_radix(&s, 16).ok())
                    .unwrap_or(0)
            };
            let (class, subclass, protocol) = (
                byte("bInterfaceClass"),
                byte("bInterfaceSubClass"),
                byte("bInterfaceProtocol"),
            );
            let ns = nodes(iface);
            let by_id = ns
                .iter()
                .filter_map(|n| links.get(Path::new(n)))
                .flatten()
                .cloned()
                .collect();
            let (kind, notes) = kind_of(class, subclass, protocol, &ns);
            interfaces.push(Interface {
                number: iface
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                class,
                subclass,
                protocol,
                kind,
                nodes: ns,
                by_id,
                notes,
            });
        }
        out.push(UsbDevice {
            sysfs: dev.display().to_string(),
            vendor_id,
            product_id,
            manufacturer: read(&dev.join("manufacturer")),
            product: read(&dev.join("product")),
            serial: read(&dev.join("serial")),
            known_scanner_vendor: SCANNER_VENDORS
                .iter()
                .find(|(v, _)| *v == vendor_id)
                .map(|(_, n)| *n),
            interfaces,
        });
    }
    out
}

/// The hidraw node name (`hidraw3`) of a device with these ids.
pub fn hidraw_for(vendor_id: u16, product_id: Option<u16>) -> Option<String> {
    let rd = fs::read_dir("/sys/class/hidraw").ok()?;
    let mut names: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.into_iter().find(|n| {
        let Some(uevent) = read(&Path::new("/sys/class/hidraw").join(n).join("device/uevent"))
        else {
            return false;
        };
        uevent
            .lines()
            .find_map(|l| l.strip_prefix("HID_ID="))
            .is_some_and(|id| {
                let parts: Vec<&str> = id.split(':').collect();
                let v = parts.get(1).and_then(|s| u32::from_str_radix(s, 16).ok());
                let p = parts.get(2).and_then(|s| u32::from_str_radix(s, 16).ok());
                v == Some(u32::from(vendor_id))
                    && product_id.is_none_or(|want| p == Some(u32::from(want)))
            })
            && is_hid_pos(n) != Some(false)
    })
}

/// Ready-to-paste `[[scanner]]` blocks for a device.
pub fn suggestions(d: &UsbDevice) -> Vec<String> {
    let name = d
        .product
        .as_deref()
        .unwrap_or("scanner")
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect::<String>()
        .trim_matches('-')
        .to_owned();
    let name = if name.is_empty() {
        "scanner".to_owned()
    } else {
        name
    };
    let ids = format!(
        "vendor_id = {:#06x}\nproduct_id = {:#06x}{}",
        d.vendor_id,
        d.product_id,
        d.serial
            .as_ref()
            .map(|s| format!("\nserial_number = \"{s}\""))
            .unwrap_or_default()
    );
    let mut out = Vec::new();
    for i in &d.interfaces {
        match i.kind.as_str() {
            "HID keyboard" => {
                out.push(format!("[[scanner]]   # keyboard wedge over libusb: keys never reach the desktop\nname = \"{name}\"\nkind = \"usb-hid\"\n{ids}\nalt_codes = true"));
                if let Some(p) = i
                    .by_id
                    .iter()
                    .find(|p| p.contains("event-kbd"))
                    .or(i.nodes.iter().find(|n| n.contains("/input/event")))
                {
                    out.push(format!("[[scanner]]   # or through evdev (grabbed)\nname = \"{name}\"\nkind = \"evdev\"\npath = \"{p}\"\nalt_codes = true"));
                }
            }
            "HID POS" => {
                let path = i
                    .nodes
                    .iter()
                    .find(|n| n.contains("hidraw"))
                    .cloned()
                    .unwrap_or_default();
                out.push(format!("[[scanner]]   # HID POS: codes as data, no keyboard layout\nname = \"{name}\"\nkind = \"hid-pos\"\n{ids}\n# path = \"{path}\"  (or a udev symlink; ids are matched when path is absent)"));
            }
            "CDC ACM (serial)" | "vendor-specific" => {
                if let Some(p) = i
                    .by_id
                    .iter()
                    .find(|p| p.contains("/serial/"))
                    .or(i.nodes.iter().find(|n| n.contains("tty")))
                {
                    out.push(format!("[[scanner]]   # serial (USB-serial or CDC ACM)\nname = \"{name}\"\nkind = \"serial\"\npath = \"{p}\"\nbaud = 9600\nterminator = \"cr\""));
                }
            }
            _ => {}
        }
    }
    out
}

/// Serial ports that are not USB (RS-232 on the mainboard), with by-id names
/// where udev made them.
pub fn other_serial_ports() -> Vec<String> {
    let Ok(rd) = fs::read_dir("/sys/class/tty") else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            // ttyS ports that have a real UART behind them.
            (n.starts_with("ttyS") && read(&e.path().join("type")).is_some_and(|t| t != "0"))
                .then(|| format!("/dev/{n}"))
        })
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(kind_of(3, 1, 1, &[]).0, "HID keyboard");
        assert_eq!(kind_of(2, 2, 1, &[]).0, "CDC ACM (serial)");
        assert_eq!(kind_of(0xff, 0, 0, &[]).0, "vendor-specific");
    }

    #[test]
    fn suggestions_for_a_keyboard_scanner() {
        let d = UsbDevice {
            sysfs: String::new(),
            vendor_id: 0x0c2e,
            product_id: 0x0b61,
            manufacturer: Some("Honeywell".into()),
            product: Some("Voyager 1450g".into()),
            serial: Some("17052B1234".into()),
            known_scanner_vendor: Some("Honeywell/Metrologic"),
            interfaces: vec![Interface {
                number: "1-1:1.0".into(),
                class: 3,
                subclass: 1,
                protocol: 1,
                kind: "HID keyboard".into(),
                nodes: vec!["/dev/hidraw0".into(), "/dev/input/event5".into()],
                by_id: vec!["/dev/input/by-id/usb-Honeywell_Voyager-event-kbd".into()],
                notes: vec![],
            }],
        };
        let s = suggestions(&d);
        assert_eq!(s.len(), 2);
        assert!(
            s[0].contains("kind = \"usb-hid\"")
                && s[0].contains("vendor_id = 0x0c2e")
                && s[0].contains("serial_number = \"17052B1234\""),
            "{}",
            s[0]
        );
        assert!(
            s[1].contains("kind = \"evdev\"")
                && s[1].contains("by-id/usb-Honeywell_Voyager-event-kbd"),
            "{}",
            s[1]
        );
        assert!(s[0].contains("name = \"voyager-1450g\""));
        // Each block is valid configuration.
        for block in s {
            let t: toml::Table = block.parse().unwrap();
            assert!(t.contains_key("scanner"));
        }
    }

    #[test]
    fn listing_this_machine_does_not_fail() {
        // Whatever is attached (often nothing in a VM): no panic, sane output.
        for d in usb_devices() {
            assert!(!d.sysfs.is_empty());
        }
        let _ = other_serial_ports();
        let _ = hidraw_for(0x0c2e, None);
    }
}

/// The shipped udev rules cover every maker in [`SCANNER_VENDORS`] and each
/// kind's device node, and keep ModemManager off serial scanners.
#[cfg(test)]
mod udev_rules {
    #[test]
    fn shipped_rules_cover_the_vendors_and_nodes() {
        let rules = include_str!("../../../udev/60-ehc-agent.rules");
        for (vid, _) in super::SCANNER_VENDORS {
            assert!(
                rules.contains(&format!("ATTRS{{idVendor}}==\"{vid:04x}\"")),
                "{vid:04x}"
            );
        }
        for subsystem in ["usb", "hidraw", "input", "tty"] {
            assert!(
                rules
                    .lines()
                    .any(|l| l.contains(&format!("SUBSYSTEM==\"{subsystem}\""))
                        && l.contains("GROUP=\"ehc-agent\"")),
                "{subsystem}"
            );
        }
        assert!(rules.contains("ENV{ID_MM_DEVICE_IGNORE}=\"1\""));
        // Every rule line: comma-separated KEY op "value" pairs.
        for l in rules
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            if l.starts_with("LABEL=") {
                continue;
            }
            for part in l.split(", ") {
                let ok = ["==", "!=", "+=", "="].iter().any(|op| {
                    part.split_once(op).is_some_and(|(k, v)| {
                        !k.is_empty() && v.starts_with('"') && v.ends_with('"')
                    })
                });
                assert!(ok, "malformed udev rule part {part:?} in {l:?}");
            }
        }
    }
}
