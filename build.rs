//! Build script: records the git revision keycard is built from, for `keycard --version` and
//! the `keycard_build_info` metric. `KEYCARD_GIT_REV` in the build's environment wins (the
//! Docker build has no `.git`); without either it is `unknown`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=KEYCARD_GIT_REV");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs");
    let revision = std::env::var("KEYCARD_GIT_REV")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            let rev = String::from_utf8(out.stdout).ok()?.trim().to_owned();
            (out.status.success() && !rev.is_empty()).then_some(rev)
        })
        .unwrap_or_else(|| "unknown".to_owned());
    // Only characters that are safe in a label value and on a terminal.
    let revision: String = revision
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'))
        .take(64)
        .collect();
    println!("cargo:rustc-env=KEYCARD_GIT_REV={revision}");
}
