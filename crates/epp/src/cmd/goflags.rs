//! Go-flag compatibility for the llm-d-router / GAIE command lines that Helm charts render:
//! `-flag` as well as `--flag`, `--flag=value` and `--flag value`, booleans as
//! `--flag=true|false` (or bare `--flag` for true), and an image started with flags only (no
//! subcommand) running `serve`, as the llm-d-router chart starts its EPP container.

use std::ffi::OsString;

use clap::CommandFactory;

/// Go's `strconv.ParseBool`: 1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False.
pub fn go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (true or false)")),
    }
}

/// A byte size as llm-d-router reads `--grpc-max-recv-msg-size`: a number with an optional
/// Kubernetes-quantity suffix (`Ki`, `Mi`, `Gi`, `k`, `M`, `G`) and an optional trailing `B`
/// (`10MiB`, `25MB`, `4194304`).
pub fn byte_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let t = if t.len() > 1 {
        t.strip_suffix(['B', 'b']).unwrap_or(t)
    } else {
        t
    };
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "{s:?}: unknown size unit {unit:?} (use e.g. 4Mi, 10MiB, 25MB)"
            ))
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4Mi, 10MiB, 25MB, 4194304)"))?;
    let v = n * mult;
    if !v.is_finite() || v < 1.0 || v > usize::MAX as f64 {
        return Err(format!("{s:?}: must be at least 1 byte"));
    }
    Ok(v as usize)
}

/// Global flags that take a value (so the word after them is not the subcommand).
const GLOBAL_WITH_VALUE: &[&str] = &[
    "--log-level",
    "--log-format",
    "--zap-encoder",
    "--zap-log-level",
    "--v",
    "-v",
];

/// Rewrite an argument list so clap reads Go-style flags: a first flag with no subcommand
/// before it means `serve`, and `-long-name[=v]` becomes `--long-name[=v]` when `long-name` is
/// a flag of that subcommand (or a global one).
pub fn normalize<C: CommandFactory>(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut args: Vec<OsString> = args.into_iter().collect();
    if args.is_empty() {
        return args;
    }
    let cmd = C::command();
    let subcommands: Vec<String> = cmd
        .get_subcommands()
        .flat_map(|s| {
            std::iter::once(s.get_name().to_string()).chain(s.get_all_aliases().map(str::to_string))
        })
        .chain(["help".to_string()])
        .collect();
    // Find the subcommand, skipping globals and their values.
    let mut i = 1;
    let mut sub: Option<String> = None;
    while i < args.len() {
        let a = args[i].to_string_lossy().to_string();
        if subcommands.contains(&a) {
            sub = Some(a);
            break;
        }
        let name = a.split('=').next().unwrap_or("");
        let dashed = format!("--{}", name.trim_start_matches('-'));
        if GLOBAL_WITH_VALUE.contains(&name) || GLOBAL_WITH_VALUE.contains(&dashed.as_str()) {
            i += if a.contains('=') { 1 } else { 2 };
            continue;
        }
        if matches!(a.as_str(), "-h" | "--help" | "-V" | "--version") {
            return args;
        }
        if a.starts_with('-') {
            // Flags first, no subcommand: the image's entrypoint was given EPP flags.
            args.insert(i, OsString::from("serve"));
            sub = Some("serve".into());
        }
        break;
    }
    // Booleans that need `=` (Go's rule), and which take a value at all.
    let bools: Vec<String> = sub
        .as_deref()
        .and_then(|n| cmd.find_subcommand(n))
        .map(|s| {
            s.get_arguments()
                .filter(|a| a.is_require_equals_set())
                .filter_map(|a| a.get_long().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let longs: Vec<String> = {
        let mut v: Vec<String> = cmd
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_string))
            .collect();
        if let Some(s) = sub.as_deref().and_then(|n| cmd.find_subcommand(n)) {
            for a in s.get_arguments() {
                if let Some(l) = a.get_long() {
                    v.push(l.to_string());
                }
                if let Some(al) = a.get_all_aliases() {
                    v.extend(al.into_iter().map(str::to_string));
                }
            }
        }
        v
    };
    for a in args.iter_mut().skip(1) {
        let s = a.to_string_lossy();
        if s == "--" {
            break;
        }
        let Some(rest) = s.strip_prefix('-') else {
            continue;
        };
        if rest.starts_with('-') || rest.len() < 2 {
            continue;
        }
        let name = rest.split('=').next().unwrap_or(rest);
        if longs.iter().any(|l| l == name) {
            *a = OsString::from(format!("--{rest}"));
        }
    }
    // GAIE's chart renders `inferenceExtension.flags` as two words, `--flag` `"value"`: for a
    // boolean that would leave a stray `false`, so `--flag true|false` is read as `--flag=...`.
    let mut out: Vec<OsString> = Vec::with_capacity(args.len());
    let mut it = args.into_iter().peekable();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy().to_string();
        let is_bool = s
            .strip_prefix("--")
            .is_some_and(|n| !n.contains('=') && bools.iter().any(|b| b == n));
        if is_bool {
            if let Some(v) = it.peek().map(|v| v.to_string_lossy().to_string()) {
                if go_bool(&v).is_ok() {
                    it.next();
                    out.push(OsString::from(format!("{s}={v}")));
                    continue;
                }
            }
        }
        out.push(a);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[arg(long, global = true)]
        log_level: Option<String>,
        #[command(subcommand)]
        cmd: Sub,
    }

    #[derive(clap::Subcommand, Debug)]
    enum Sub {
        Serve {
            #[arg(long)]
            pool_name: Option<String>,
            #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
            secure_serving: Option<bool>,
        },
        Sim,
    }

    fn norm(args: &[&str]) -> Vec<String> {
        normalize::<Cli>(
            std::iter::once("epp")
                .chain(args.iter().copied())
                .map(OsString::from),
        )
        .into_iter()
        .map(|s| s.to_string_lossy().to_string())
        .collect()
    }

    #[test]
    fn chart_command_lines_become_serve_with_long_flags() {
        assert_eq!(
            norm(&["--pool-name", "p", "-secure-serving=false"]),
            ["epp", "serve", "--pool-name", "p", "--secure-serving=false"]
        );
        // GAIE's two-word form of a boolean.
        assert_eq!(
            norm(&["-pool-name=p", "--secure-serving", "false"]),
            ["epp", "serve", "--pool-name=p", "--secure-serving=false"]
        );
        // A bare boolean followed by another flag stays bare.
        assert_eq!(
            norm(&["serve", "--secure-serving", "--pool-name", "p"]),
            ["epp", "serve", "--secure-serving", "--pool-name", "p"]
        );
        // Globals before the flags; explicit subcommands, help and version are left alone.
        assert_eq!(
            norm(&["--log-level", "debug", "--pool-name", "p"]),
            ["epp", "--log-level", "debug", "serve", "--pool-name", "p"]
        );
        assert_eq!(norm(&["sim"]), ["epp", "sim"]);
        assert_eq!(norm(&["--version"]), ["epp", "--version"]);
        assert_eq!(norm(&["-h"]), ["epp", "-h"]);
        // An unknown single-dash word is not rewritten (clap then names it).
        assert_eq!(norm(&["serve", "-bogus"]), ["epp", "serve", "-bogus"]);
    }

    #[test]
    fn go_booleans_and_sizes() {
        for t in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(go_bool(t), Ok(true));
        }
        for f in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(go_bool(f), Ok(false));
        }
        assert!(go_bool("yes").is_err());
        assert_eq!(byte_size("10MiB"), Ok(10 * 1024 * 1024));
        assert_eq!(byte_size("25MB"), Ok(25_000_000));
        assert_eq!(byte_size("4Mi"), Ok(4 * 1024 * 1024));
        assert_eq!(byte_size("4194304"), Ok(4_194_304));
        assert!(byte_size("10XB").is_err());
        assert!(byte_size("0").is_err());
        assert!(byte_size("lots").is_err());
    }
}
