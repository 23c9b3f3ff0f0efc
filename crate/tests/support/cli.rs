//! Running the `vramfit` binary as a person would, for the command-line tests (`crate/tests/cli.rs`,
//! `crate/tests/cli_input.rs`), which include this file with `#[path]`.

use std::process::Command;

/// Runs vramfit; returns (exit code, stdout, stderr).
pub fn vramfit(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vramfit"))
        .args(args)
        .output()
        .expect("vramfit runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a command that must fail with status 2, with one message and no panic, and returns the message.
pub fn error_of(args: &[&str]) -> String {
    let (code, out, err) = vramfit(args);
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    assert_eq!(
        code, 2,
        "{args:?}: expected exit 2, got {code}; stdout: {out}"
    );
    assert_eq!(err.lines().count(), 1, "{args:?}: one message: {err}");
    err.trim().to_string()
}
