//! The module references of one file: paths and use trees that start with `crate::`,
//! `super::` or `self::`, resolved against the file's module (and the inline modules around
//! them) and seen through the re-exports (`pub use`) of the module they name.

use std::collections::{BTreeMap, BTreeSet};

use super::tokens::{tokenize, Token};
use super::{ModPath, Reference};

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
pub type Reexports = BTreeMap<(ModPath, String), Vec<String>>;

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
pub fn reexports_of(module: &[String], source: &str, modules: &BTreeSet<ModPath>) -> Reexports {
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
pub fn references(
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
