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
//!   prefix of the resolved path that names a module, seen through that module's `pub use`
//!   re-exports: `super::Context`, which `guest` re-exports from `guest::state`, is a
//!   reference to `guest::state`. Comments (doc links included) and string literals are not
//!   code and do not count. (`tokens` reads the source; `paths` finds the references.)
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

mod paths;
mod tokens;

use paths::{reexports_of, references, Reexports};

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
/// to). None: every cycle fails the check.
const ALLOWED_EDGES: &[(&str, &str, &str, &str)] = &[];

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
