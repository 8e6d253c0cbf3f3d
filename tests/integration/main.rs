//! ehc-agent's integration tests: one binary (as ripgrep does), modules by
//! subject. Everything here talks real HTTP to the simulator on port 0 and
//! runs the real `ehc-agent` binary where a command is under test.

mod cli;
mod client;
mod cold_scan;
mod common;
mod crash;
mod daemon;
mod disk;
mod fleet;
mod fuzz_regressions;
mod gateway;
mod gateway_ha;
mod his_access;
mod his_examples;
mod his_http;
mod outbox;
mod outbox_cli;
mod packaging;
mod reload;
mod scan_path;
mod serial;
mod service;
mod sim;
