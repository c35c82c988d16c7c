//! The two documents a newcomer reads first name real code: every source
//! path in backticks in `README.md` and `docs/ARCHITECTURE.md` exists, and
//! every `a::b::name` in backticks names something defined in the
//! workspace's (or the vendored smoltcp's) Rust source — a function, type,
//! trait, constant, static, module, macro, enum variant or public field —
//! or is an item of a crate from crates.io in `Cargo.lock`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Every file and directory under `dir` (relative, with `/`), except build
/// output and git's own.
fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if matches!(name.as_str(), "target" | ".git") {
            continue;
        }
        let rel = path
            .strip_prefix(root)
            .expect("under the root")
            .to_string_lossy()
            .replace('\\', "/");
        if path.is_dir() {
            out.push(format!("{rel}/"));
            walk(root, &path, out);
        } else {
            out.push(rel);
        }
    }
}

/// Identifiers the Rust sources define (items and enum variants).
fn definitions(root: &Path, files: &[String]) -> HashSet<String> {
    let mut defs = HashSet::new();
    for f in files.iter().filter(|f| f.ends_with(".rs")) {
        let Ok(text) = std::fs::read_to_string(root.join(f)) else {
            continue;
        };
        for line in text.lines() {
            let words: Vec<&str> = line
                .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '!'))
                .filter(|w| !w.is_empty())
                .collect();
            for pair in words.windows(2) {
                if matches!(
                    pair[0],
                    "fn" | "struct"
                        | "enum"
                        | "trait"
                        | "const"
                        | "static"
                        | "mod"
                        | "type"
                        | "macro_rules!"
                ) {
                    defs.insert(pair[1].to_string());
                }
            }
            // A public field.
            if let Some(rest) = line.trim_start().strip_prefix("pub ") {
                let word: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if rest[word.len()..].starts_with(':') {
                    defs.insert(word);
                }
            }
            // An enum variant: a capitalised word opening an indented line.
            let t = line.trim_start();
            if t.len() < line.len() {
                let word: String = t
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if word.starts_with(|c: char| c.is_ascii_uppercase()) {
                    defs.insert(word);
                }
            }
        }
    }
    defs
}

fn backticked(text: &str) -> impl Iterator<Item = &str> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|t| !t.contains('\n'))
}

fn is_ident(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

/// A source path: `.rs` files and directories under a top-level
/// directory of the repository (example NBD names such as `data/a.bin`
/// and generated files are not).
fn source_path<'a>(tok: &'a str, top: &HashSet<String>) -> Option<&'a str> {
    if !tok.contains('/') || tok.contains(' ') || tok.starts_with("target/") {
        return None;
    }
    let first = tok.split('/').next()?;
    (tok.ends_with(".rs") || top.contains(&format!("{first}/"))).then_some(tok)
}

#[test]
fn the_readme_and_architecture_name_paths_and_items_that_exist() {
    let root = root();
    let mut files = Vec::new();
    walk(&root, &root, &mut files);
    let top: HashSet<String> = files
        .iter()
        .filter(|f| f.ends_with('/') && f.matches('/').count() == 1)
        .cloned()
        .collect();
    let defs = definitions(&root, &files);
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).expect("Cargo.lock");
    // The control: the check can tell a made-up name and path from real ones.
    assert!(defs.contains("poll_socket") && !defs.contains("no_such_function_here"));
    assert!(files.iter().any(|f| f == "drivers/nvme/src/queue.rs"));
    let mut wrong = Vec::new();
    let mut checked = 0;
    for doc in ["README.md", "docs/ARCHITECTURE.md"] {
        let text = std::fs::read_to_string(root.join(doc)).expect("the document");
        for tok in backticked(&text) {
            if let Some(p) = source_path(tok, &top) {
                checked += 1;
                // Paths may be given from a crate's `src/` (`net/nbd.rs`).
                let dir = format!("{}/", p.trim_end_matches('/'));
                let found = files.iter().any(|f| {
                    f == p
                        || f == &dir
                        || f.ends_with(&format!("/{p}"))
                        || f.ends_with(&format!("/{dir}"))
                });
                if !found {
                    wrong.push(format!("{doc}: no path {p}"));
                }
                continue;
            }
            let segs: Vec<&str> = tok.split("::").collect();
            if segs.len() >= 2 && segs.iter().all(|s| is_ident(s)) {
                checked += 1;
                let last = segs[segs.len() - 1];
                // A crate from crates.io is named by its first segment.
                let external = lock.contains(&format!("name = \"{}\"", segs[0].replace('_', "-")));
                if !defs.contains(last) && !external {
                    wrong.push(format!("{doc}: nothing named {tok}"));
                }
            }
        }
    }
    assert!(checked > 100, "only {checked} names and paths found");
    assert!(
        wrong.is_empty(),
        "{} stale:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}
