//! No two modules import each other: the module graphs of `vmm-core` and `failover`, read
//! from their sources, have no cycle among peer modules (beyond the one allow-listed below).
//!
//! The rule this check enforces, per crate:
//!
//! - A *module* is a file module: `lib.rs` is the crate root, `a.rs` or `a/mod.rs` is `a`,
//!   `a/b.rs` is `a::b`. A `mod tests { .. }` or other inline module counts as part of the
//!   file it is written in.
//! - A *reference* is a path that starts with `crate::`, `super::` or `self::` anywhere in the
//!   code, `use` trees included (`use crate::{a::X, b::{c::Y}}`). It points at the longest
//!   prefix of the resolved path that names a module. Comments (doc links included) and
//!   string literals are not code and do not count.
//! - Only *peers* can import each other. A reference from `a::x` to `b::y` is counted as an
//!   edge between the children of their closest common ancestor: `a` → `b` between the crate
//!   root's children. A reference between a module and one of its own ancestors (a child using
//!   its parent's items through `super::`, a parent using its children's) is structure, not
//!   an edge: the parent declares the child.
//! - The rule: among the children of any one module, the edges form no cycle. A cycle is
//!   reported with the references that make up each of its edges.
//!
//! Run `cargo test --test module_cycles -- --nocapture` (or `scripts/module-cycles`) to see
//! every edge and every cycle, the allow-listed one included.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// A module's path inside its crate: `["guest", "mode"]` for `guest/mode.rs`; empty for the
/// crate root.
type ModPath = Vec<String>;

/// One reference from a file to a module: where it is and what it names.
#[derive(Debug, Clone)]
struct Reference {
    from: ModPath,
    to: ModPath,
    file: String,
    line: usize,
    text: String,
}

/// An edge between two peers, under their parent, with the references it stands for.
type PeerEdges = BTreeMap<(ModPath, String, String), Vec<Reference>>;

/// Edges allowed to close a cycle, each (crate, parent module or "" for the crate root, from,
/// to). Only one circle is allowed, and it is being removed: `failover`'s `control` →
/// `guest` → `remote` → `control` (`control::reply_for` maps a `guest::GuestError`;
/// `guest::process` serves a remote standby through `remote`; `remote` binds the attach socket
/// and reports roles with `control`'s helpers and protocol types). Within it `guest` also
/// uses `control` directly: `guest::process` binds its socket with `control`'s helpers, and
/// the guest's records and phases are `control::protocol` types. The standby-process modules
/// that close the circle are being rewritten; these entries go when it is gone. Any other
/// cycle, or another edge inside this one, fails the check.
const ALLOWED_EDGES: &[(&str, &str, &str, &str)] = &[
    ("failover", "", "control", "guest"),
    ("failover", "", "guest", "control"),
    ("failover", "", "guest", "remote"),
    ("failover", "", "remote", "control"),
];

fn render(path: &[String]) -> String {
    if path.is_empty() {
        "crate".to_string()
    } else {
        path.join("::")
    }
}

/// Every `.rs` file under `src`, with its module path.
fn file_modules(src: &Path) -> Vec<(ModPath, PathBuf)> {
    let mut found = Vec::new();
    let mut pending = vec![src.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|entry| entry.expect("a directory entry").path());
        for path in entries {
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let relative = path.strip_prefix(src).expect("a file under src");
            let mut parts: ModPath = relative
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let last = parts.pop().expect("a file name");
            let stem = last.trim_end_matches(".rs");
            if !(parts.is_empty() && stem == "lib") && stem != "mod" {
                parts.push(stem.to_string());
            }
            found.push((parts, path));
        }
    }
    found.sort();
    found
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    PathSep,
    Punct(char),
}

/// The tokens of a Rust source that matter for paths, each with its line; comments, string,
/// character and number literals are dropped.
fn tokenize(source: &str) -> Vec<(Token, usize)> {
    let chars: Vec<char> = source.chars().collect();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut i = 0;
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            loop {
                if i >= chars.len() {
                    break;
                }
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if chars[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if c == '"' || ((c == 'r' || c == 'b') && is_string_start(&chars, i)) {
            // A string literal, raw (`r#"…"#`) or not, byte string or not.
            let mut j = i;
            if chars[j] == 'b' {
                j += 1;
            }
            let raw = chars[j] == 'r';
            let mut hashes = 0;
            if raw {
                j += 1;
                while chars[j] == '#' {
                    hashes += 1;
                    j += 1;
                }
            }
            j += 1; // the opening quote
            loop {
                if j >= chars.len() {
                    break;
                }
                let d = chars[j];
                if d == '\n' {
                    line += 1;
                }
                if !raw && d == '\\' {
                    if at(j + 1) == '\n' {
                        line += 1;
                    }
                    j += 2;
                    continue;
                }
                if d == '"' && (0..hashes).all(|k| at(j + 1 + k) == '#') {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            i = j;
        } else if c == '\'' {
            // A character literal (`'a'`, `'\n'`, `b'x'` is caught as `b` then this) or a
            // lifetime (`'a`), which is skipped as its quote alone.
            if at(i + 1) == '\\' {
                let mut j = i + 2;
                while j < chars.len() && chars[j] != '\'' {
                    j += 1;
                }
                i = j + 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                i += 1;
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if word == "b" && at(i) == '\'' {
                // A byte literal: skip it whole.
                let mut j = i + 1;
                if at(j) == '\\' {
                    j += 1;
                }
                j += 1;
                while j < chars.len() && chars[j] != '\'' {
                    j += 1;
                }
                i = j + 1;
                continue;
            }
            tokens.push((Token::Ident(word), line));
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
        } else if c == ':' && at(i + 1) == ':' {
            tokens.push((Token::PathSep, line));
            i += 2;
        } else {
            tokens.push((Token::Punct(c), line));
            i += 1;
        }
    }
    tokens
}

/// Whether a string literal starts at `i` with a prefix: `r"`, `r#"`, `b"`, `br"`, `br#"`.
fn is_string_start(chars: &[char], i: usize) -> bool {
    if i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_') {
        return false;
    }
    let mut j = i;
    if chars[j] == 'b' {
        j += 1;
    }
    if chars.get(j) == Some(&'r') {
        j += 1;
        while chars.get(j) == Some(&'#') {
            j += 1;
        }
    }
    j > i && chars.get(j) == Some(&'"')
}

/// One path a path expression or use tree names, with the name a `use` gives it (`as`).
#[derive(Debug, Clone)]
struct NamedPath {
    segments: Vec<String>,
    alias: Option<String>,
}

/// The paths a path or use tree starting at `tokens[i]` names, and the index after it.
fn parse_tree(tokens: &[(Token, usize)], mut i: usize) -> (Vec<NamedPath>, usize) {
    let token = |i: usize| tokens.get(i).map(|t| &t.0);
    let mut prefix = Vec::new();
    loop {
        match token(i) {
            Some(Token::Ident(word)) => {
                prefix.push(word.clone());
                i += 1;
            }
            Some(Token::Punct('{')) => {
                let mut paths = Vec::new();
                i += 1;
                loop {
                    match token(i) {
                        Some(Token::Punct('}')) | None => {
                            i += 1;
                            break;
                        }
                        Some(Token::Punct(',')) => i += 1,
                        Some(Token::Ident(_)) | Some(Token::Punct('{')) => {
                            let (inner, next) = parse_tree(tokens, i);
                            for mut path in inner {
                                if path.segments.first().map(String::as_str) == Some("self") {
                                    path.segments.remove(0);
                                }
                                let mut segments = prefix.clone();
                                segments.extend(path.segments);
                                paths.push(NamedPath {
                                    segments,
                                    alias: path.alias,
                                });
                            }
                            i = next;
                        }
                        // `*` and whatever else a tree may hold.
                        Some(_) => i += 1,
                    }
                }
                return (paths, i);
            }
            _ => {
                return (
                    vec![NamedPath {
                        segments: prefix,
                        alias: None,
                    }],
                    i,
                )
            }
        }
        if token(i) == Some(&Token::PathSep) {
            i += 1;
            continue;
        }
        let mut alias = None;
        if token(i) == Some(&Token::Ident("as".to_string())) {
            if let Some(Token::Ident(name)) = token(i + 1) {
                alias = Some(name.clone());
            }
            i += 2;
        }
        return (
            vec![NamedPath {
                segments: prefix,
                alias,
            }],
            i,
        );
    }
}

/// Where a path written in module `current` points, as an absolute path; `None` for paths
/// that start with none of `crate`, `super`, `self` or (with `children`) a child module of
/// `current`, as a `use` inside a module may name its children.
fn resolve(
    current: &[String],
    path: &[String],
    modules: &BTreeSet<ModPath>,
    children: bool,
) -> Option<Vec<String>> {
    let mut base: Vec<String> = current.to_vec();
    let mut rest = path.iter().peekable();
    match rest.peek().map(|s| s.as_str()) {
        Some("crate") => {
            base.clear();
            rest.next();
        }
        Some("super") | Some("self") => {}
        Some(first) if children && modules.contains(&[current, &[first.to_string()]].concat()) => {}
        _ => return None,
    }
    while let Some(segment) = rest.peek() {
        match segment.as_str() {
            "super" => {
                base.pop();
                rest.next();
            }
            "self" => {
                rest.next();
            }
            _ => break,
        }
    }
    base.extend(rest.cloned());
    Some(base)
}

/// What each module makes visible to others under a name of its own with `pub use` (any
/// `pub(..)` too): (module, name) → the absolute path it stands for.
type Reexports = BTreeMap<(ModPath, String), Vec<String>>;

/// The module an absolute path names an item of: the longest prefix that is a module, seen
/// through re-exports, so that `super::Context` re-exported by the parent from `state` is a
/// reference to `state`.
fn target(absolute: &[String], modules: &BTreeSet<ModPath>, reexports: &Reexports) -> ModPath {
    let mut path = absolute.to_vec();
    for _ in 0..16 {
        let module = (0..=path.len())
            .rev()
            .map(|n| path[..n].to_vec())
            .find(|prefix| modules.contains(prefix))
            .unwrap_or_default();
        let Some(name) = path.get(module.len()) else {
            return module;
        };
        match reexports.get(&(module.clone(), name.clone())) {
            Some(source) if !source.starts_with(&path) => {
                let mut next = source.clone();
                next.extend(path[module.len() + 1..].iter().cloned());
                path = next;
            }
            _ => return module,
        }
    }
    path
}

/// The `pub use` declarations of one file module, at its top level.
fn reexports_of(module: &[String], source: &str, modules: &BTreeSet<ModPath>) -> Reexports {
    let tokens = tokenize(source);
    let mut found = Reexports::new();
    let mut depth = 0;
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i].0 {
            Token::Punct('{') => depth += 1,
            Token::Punct('}') => depth -= 1,
            Token::Ident(word) if word == "pub" && depth == 0 => {
                let mut j = i + 1;
                if tokens.get(j).map(|t| &t.0) == Some(&Token::Punct('(')) {
                    while j < tokens.len() && tokens[j].0 != Token::Punct(')') {
                        j += 1;
                    }
                    j += 1;
                }
                if tokens.get(j).map(|t| &t.0) == Some(&Token::Ident("use".to_string())) {
                    let (paths, next) = parse_tree(&tokens, j + 1);
                    for path in paths {
                        let Some(absolute) = resolve(module, &path.segments, modules, true) else {
                            continue;
                        };
                        let name = path.alias.or_else(|| absolute.last().cloned());
                        if let Some(name) = name {
                            found.insert((module.to_vec(), name), absolute);
                        }
                    }
                    i = next;
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    found
}

/// Every reference in one file module's source.
fn references(
    module: &[String],
    file: &str,
    source: &str,
    modules: &BTreeSet<ModPath>,
    reexports: &Reexports,
) -> Vec<Reference> {
    let tokens = tokenize(source);
    let lines: Vec<&str> = source.lines().collect();
    let mut found = Vec::new();
    // Inline modules open at the current point, with the brace depth their body is at.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0;
    let mut i = 0;
    while i < tokens.len() {
        let (token, line) = &tokens[i];
        match token {
            Token::Punct('{') => {
                depth += 1;
                i += 1;
                continue;
            }
            Token::Punct('}') => {
                if inline.last().map(|(_, d)| *d) == Some(depth) {
                    inline.pop();
                }
                depth -= 1;
                i += 1;
                continue;
            }
            Token::Ident(word) if word == "mod" => {
                if let (Some((Token::Ident(name), _)), Some((Token::Punct('{'), _))) =
                    (tokens.get(i + 1), tokens.get(i + 2))
                {
                    inline.push((name.clone(), depth + 1));
                }
                i += 1;
                continue;
            }
            Token::Ident(word)
                if matches!(word.as_str(), "crate" | "super" | "self")
                    && tokens.get(i + 1).map(|t| &t.0) == Some(&Token::PathSep)
                    && (i == 0 || tokens[i - 1].0 != Token::PathSep) =>
            {
                let (paths, next) = parse_tree(&tokens, i);
                let mut current: Vec<String> = module.to_vec();
                current.extend(inline.iter().map(|(name, _)| name.clone()));
                let mut seen = BTreeSet::new();
                for path in paths {
                    let Some(absolute) = resolve(&current, &path.segments, modules, false) else {
                        continue;
                    };
                    let to = target(&absolute, modules, reexports);
                    if seen.insert(to.clone()) {
                        found.push(Reference {
                            from: module.to_vec(),
                            to,
                            file: file.to_string(),
                            line: *line,
                            text: lines.get(line - 1).unwrap_or(&"").trim().to_string(),
                        });
                    }
                }
                i = next.max(i + 1);
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    found
}

/// The edges between peers that a crate's references make, keyed by (parent, from, to).
fn peer_edges(crate_dir: &Path) -> PeerEdges {
    let src = crate_dir.join("src");
    let files: Vec<(ModPath, PathBuf, String)> = file_modules(&src)
        .into_iter()
        .map(|(module, path)| {
            let source = fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            (module, path, source)
        })
        .collect();
    let modules: BTreeSet<ModPath> = files.iter().map(|(m, _, _)| m.clone()).collect();
    let reexports: Reexports = files
        .iter()
        .flat_map(|(module, _, source)| reexports_of(module, source, &modules))
        .collect();
    let mut edges: PeerEdges = BTreeMap::new();
    for (module, path, source) in &files {
        let file = path
            .strip_prefix(crate_dir.parent().unwrap_or(crate_dir))
            .unwrap_or(path)
            .display()
            .to_string();
        for reference in references(module, &file, source, &modules, &reexports) {
            let common = reference
                .from
                .iter()
                .zip(&reference.to)
                .take_while(|(a, b)| a == b)
                .count();
            if common == reference.from.len() || common == reference.to.len() {
                continue; // a module and its own ancestor or descendant
            }
            let key = (
                reference.from[..common].to_vec(),
                reference.from[common].clone(),
                reference.to[common].clone(),
            );
            edges.entry(key).or_default().push(reference);
        }
    }
    edges
}

/// The strongly connected components with more than one module, per parent: each a set of
/// peers that import each other, directly or around a circle.
fn cycles(edges: &PeerEdges) -> Vec<(ModPath, BTreeSet<String>)> {
    let mut by_parent: BTreeMap<&ModPath, BTreeMap<&str, BTreeSet<&str>>> = BTreeMap::new();
    for (parent, from, to) in edges.keys() {
        by_parent
            .entry(parent)
            .or_default()
            .entry(from.as_str())
            .or_default()
            .insert(to.as_str());
    }
    let mut found = Vec::new();
    for (parent, graph) in by_parent {
        let nodes: BTreeSet<&str> = graph
            .iter()
            .flat_map(|(from, tos)| std::iter::once(*from).chain(tos.iter().copied()))
            .collect();
        let reaches = |start: &str| {
            let mut seen = BTreeSet::new();
            let mut pending = vec![start];
            while let Some(node) = pending.pop() {
                for next in graph.get(node).into_iter().flatten() {
                    if seen.insert(*next) {
                        pending.push(next);
                    }
                }
            }
            seen
        };
        let reach: BTreeMap<&str, BTreeSet<&str>> =
            nodes.iter().map(|n| (*n, reaches(n))).collect();
        let mut placed = BTreeSet::new();
        for node in &nodes {
            if placed.contains(node) || !reach[node].contains(node) {
                continue;
            }
            let component: BTreeSet<String> = nodes
                .iter()
                .filter(|other| reach[node].contains(*other) && reach[*other].contains(node))
                .map(|s| s.to_string())
                .collect();
            placed.extend(
                component
                    .iter()
                    .map(|s| nodes.get(s.as_str()).copied().unwrap_or("")),
            );
            found.push((parent.clone(), component));
        }
    }
    found
}

/// The cycles of one crate that are not allow-listed, described for a failure message; the
/// whole graph is printed along the way.
fn check_crate(name: &str) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let edges = peer_edges(&root.join(name));
    println!("{name}: edges between peers");
    for ((parent, from, to), refs) in &edges {
        println!(
            "  [{}] {from} -> {to} ({} references)",
            render(parent),
            refs.len()
        );
    }
    let allowed = |parent: &ModPath, from: &str, to: &str| {
        ALLOWED_EDGES.iter().any(|(c, p, f, t)| {
            *c == name
                && render(parent) == if p.is_empty() { "crate" } else { p }
                && *f == from
                && *t == to
        })
    };
    let mut failures = Vec::new();
    for (parent, component) in cycles(&edges) {
        let mut report = format!(
            "{name}: modules under {} import each other: {}\n",
            render(&parent),
            component.iter().cloned().collect::<Vec<_>>().join(", ")
        );
        let mut all_allowed = true;
        for ((p, from, to), refs) in &edges {
            if *p != parent || !component.contains(from) || !component.contains(to) {
                continue;
            }
            let ok = allowed(&parent, from, to);
            all_allowed &= ok;
            report += &format!(
                "  {from} -> {to}{}\n",
                if ok { " (allow-listed)" } else { "" }
            );
            for r in refs {
                report += &format!(
                    "    {}:{} ({} -> {}): {}\n",
                    r.file,
                    r.line,
                    render(&r.from),
                    render(&r.to),
                    r.text
                );
            }
        }
        println!("{report}");
        if !all_allowed {
            failures.push(report);
        }
    }
    failures
}

#[test]
fn vmm_core_modules_do_not_import_each_other() {
    let failures = check_crate("vmm-core");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn failover_modules_do_not_import_each_other() {
    let failures = check_crate("failover");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_check_sees_use_trees_super_paths_reexports_and_inline_modules() {
    let path = |p: &str| -> ModPath {
        p.split("::")
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    };
    let modules: BTreeSet<ModPath> = ["", "a", "a::b", "a::e", "c", "d"]
        .into_iter()
        .map(path)
        .collect();
    let reexports = reexports_of(
        &path("a"),
        "pub(crate) use e::{Thing, Other as Renamed};",
        &modules,
    );
    let source = r#"
        // use crate::c::Commented;
        /// [`crate::c::DocLink`]
        use crate::{c::{self, X}, d::Y as Z};
        const TEXT: &str = "crate::d::Quoted";
        fn f<'a>(x: &'a str) -> char { let _ = super::super::c::F; 'x' }
        fn g() -> super::Renamed { super::Thing::new() }
        #[cfg(test)]
        mod tests {
            use super::super::B;
        }
    "#;
    let found = references(&path("a::b"), "x.rs", source, &modules, &reexports);
    let targets: Vec<String> = found.iter().map(|r| render(&r.to)).collect();
    assert_eq!(targets, ["c", "d", "c", "a::e", "a::e", "a"]);
}
