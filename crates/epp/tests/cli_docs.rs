//! `docs/cli.md` is the generated flag reference of every subcommand. This test regenerates it
//! from the real binary's `--help` and fails when the committed file differs, so the docs cannot
//! drift from the flags. Update it with:
//!
//!     EPP_UPDATE_CLI_DOCS=1 cargo test -p epp --test cli_docs

use std::process::Command;

const SUBCOMMANDS: [&str; 7] = [
    "serve",
    "proxy",
    "sim",
    "bench",
    "demo",
    "doctor",
    "check-config",
];

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_epp"))
        .args(args)
        .env_remove("RUST_LOG")
        .env("COLUMNS", "100")
        .output()
        .expect("epp runs");
    assert!(out.status.success(), "epp {args:?} failed");
    String::from_utf8(out.stdout).expect("utf-8 help")
}

fn render() -> String {
    let mut s = String::from(
        "# `epp` command-line reference\n\n\
         Generated from `epp <command> --help` by `EPP_UPDATE_CLI_DOCS=1 cargo test -p epp --test cli_docs`;\n\
         the same test fails when this file and the binary disagree.\n\n",
    );
    s.push_str("## `epp`\n\n```text\n");
    s.push_str(help(&["--help"]).trim_end());
    s.push_str("\n```\n");
    for sub in SUBCOMMANDS {
        s.push_str(&format!("\n## `epp {sub}`\n\n```text\n"));
        s.push_str(help(&[sub, "--help"]).trim_end());
        s.push_str("\n```\n");
    }
    s
}

#[test]
fn cli_reference_matches_the_binary() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/cli.md");
    let want = render();
    if std::env::var_os("EPP_UPDATE_CLI_DOCS").is_some() {
        std::fs::write(path, &want).expect("write docs/cli.md");
        return;
    }
    let have = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        have == want,
        "docs/cli.md is out of date; run `EPP_UPDATE_CLI_DOCS=1 cargo test -p epp --test cli_docs`"
    );
}

#[test]
fn every_subcommand_has_version_and_rejects_unknown_flags() {
    let v = help(&["--version"]);
    assert_eq!(v.trim(), format!("epp {}", env!("CARGO_PKG_VERSION")));
    for sub in SUBCOMMANDS {
        let out = Command::new(env!("CARGO_BIN_EXE_epp"))
            .args([sub, "--no-such-flag"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{sub}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--no-such-flag"), "{sub}: {err}");
    }
}
