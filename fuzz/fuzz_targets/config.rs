//! Any configuration text is parsed or refused with problems, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // The parser reads the files a configuration names (secret, CA); device
    // and kernel files would only make the fuzzer wait, not find bugs.
    if ["/dev", "/proc", "/sys", "/run"].iter().any(|p| text.contains(p)) {
        return;
    }
    if let Err(problems) = ehc_agent::config::parse(&text, std::path::Path::new("/nonexistent"), &Default::default()) {
        assert!(!problems.is_empty());
    }
});
