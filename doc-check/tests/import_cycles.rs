//! Architecture invariant: no file-level import cycle anywhere in the workspace.
//!
//! A file *imports* another when its code (comments and `#[cfg(test)]` modules aside) names
//! a path into the other file's module: `crate::a::b::…` or `super::…`, resolved to the
//! longest module path that is a file of the same crate. A file never counts as importing
//! its own ancestors (a submodule may use its parent's items). Every crate's `src/` is
//! checked, and a cycle is reported with the files it runs through.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// A module path inside one crate: `["service", "device"]` for `src/service/device.rs`.
type ModPath = Vec<String>;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("doc-check sits in the workspace")
        .to_path_buf()
}

/// The `src/` folders of every crate in the tree (a `Cargo.toml` beside them).
fn crate_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !path.is_dir() || name.starts_with('.') || name == "target" {
            continue;
        }
        if name == "src" && dir.join("Cargo.toml").is_file() {
            out.push(path.clone());
        }
        crate_sources(&path, out);
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("readable source folder").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/a/b.rs` → `[a, b]`; `src/a/mod.rs` → `[a]`; `src/lib.rs`, `src/main.rs` → `[]`.
fn module_path(src: &Path, file: &Path) -> ModPath {
    let rel = file.strip_prefix(src).expect("file under src");
    let mut parts: ModPath = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The file's code without line comments and without its `#[cfg(test)]` tail.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|line| match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The `a::b::c` segments that follow each occurrence of `prefix` (`crate::` or `super::`)
/// at a word boundary.
fn paths_after(code: &str, prefix: &str) -> Vec<ModPath> {
    let mut found = vec![];
    let mut from = 0;
    while let Some(i) = code[from..].find(prefix) {
        let at = from + i;
        from = at + prefix.len();
        if code[..at].chars().next_back().is_some_and(is_ident) {
            continue;
        }
        let mut segments = vec![];
        let mut rest = &code[from..];
        loop {
            let len = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
            if len == 0 {
                break;
            }
            segments.push(rest[..len].to_string());
            rest = &rest[len..];
            match rest.strip_prefix("::") {
                Some(r) => rest = r,
                None => break,
            }
        }
        found.push(segments);
    }
    found
}

/// The longest prefix of `path` that is a module of the crate.
fn resolve(path: &[String], modules: &BTreeSet<ModPath>) -> Option<ModPath> {
    (1..=path.len())
        .rev()
        .map(|k| path[..k].to_vec())
        .find(|p| modules.contains(p))
}

/// One crate's file-level import graph.
fn import_graph(src: &Path) -> BTreeMap<ModPath, BTreeSet<ModPath>> {
    let mut files = vec![];
    rust_files(src, &mut files);
    // A binary's `main.rs` is its own crate root beside `lib.rs`; it imports the library by
    // name, not through `crate::`, so it is left out.
    let files: Vec<PathBuf> = files
        .into_iter()
        .filter(|f| {
            !(f.parent() == Some(src) && f.ends_with("main.rs") && src.join("lib.rs").is_file())
        })
        .collect();
    let modules: BTreeSet<ModPath> = files.iter().map(|f| module_path(src, f)).collect();
    let mut graph = BTreeMap::new();
    for file in &files {
        let me = module_path(src, file);
        let code = code_of(&fs::read_to_string(file).expect("readable source file"));
        let is_mod_rs = me.is_empty() || file.ends_with("mod.rs");
        let parent: ModPath = if is_mod_rs {
            me.iter()
                .take(me.len().saturating_sub(1))
                .cloned()
                .collect()
        } else {
            me[..me.len() - 1].to_vec()
        };
        let mut targets = BTreeSet::new();
        let mut add = |path: ModPath| {
            if let Some(target) = resolve(&path, &modules) {
                let ancestor = me.len() > target.len() && me[..target.len()] == target[..];
                if target != me && !ancestor {
                    targets.insert(target);
                }
            }
        };
        for path in paths_after(&code, "crate::") {
            add(path);
        }
        for path in paths_after(&code, "super::") {
            add(parent.iter().cloned().chain(path).collect());
        }
        graph.insert(me, targets);
    }
    graph
}

/// The strongly connected components with more than one file (Tarjan's algorithm).
fn cycles(graph: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Vec<Vec<ModPath>> {
    struct State<'a> {
        graph: &'a BTreeMap<ModPath, BTreeSet<ModPath>>,
        index: BTreeMap<&'a ModPath, usize>,
        low: BTreeMap<&'a ModPath, usize>,
        stack: Vec<&'a ModPath>,
        on_stack: BTreeSet<&'a ModPath>,
        next: usize,
        found: Vec<Vec<ModPath>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a ModPath) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        let graph = s.graph;
        for w in graph.get(v).into_iter().flatten() {
            let Some((w, _)) = graph.get_key_value(w) else {
                continue;
            };
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = vec![];
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.clone());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                s.found.push(component);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: vec![],
        on_stack: BTreeSet::new(),
        next: 0,
        found: vec![],
    };
    for v in graph.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.found
}

fn show(m: &ModPath) -> String {
    if m.is_empty() {
        "lib".into()
    } else {
        m.join("/")
    }
}

#[test]
fn no_file_level_import_cycle_in_any_crate() {
    let root = workspace_root();
    let mut sources = vec![];
    crate_sources(&root, &mut sources);
    sources.sort();
    assert!(
        sources.len() >= 9,
        "expected every crate's src/ under {}, found {sources:?}",
        root.display()
    );
    let mut problems = vec![];
    for src in &sources {
        for component in cycles(&import_graph(src)) {
            let files: Vec<String> = component.iter().map(show).collect();
            let krate = src.parent().unwrap().strip_prefix(&root).unwrap();
            problems.push(format!("{}: {}", krate.display(), files.join(" ↔ ")));
        }
    }
    assert!(
        problems.is_empty(),
        "file-level import cycles:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_checker_finds_a_cycle_and_ignores_parents_and_tests() {
    let dir = std::env::temp_dir().join(format!("fedpref-cycles-{}", std::process::id()));
    let src = dir.join("src");
    fs::create_dir_all(src.join("service")).unwrap();
    fs::write(
        src.join("lib.rs"),
        "pub mod a;\npub mod b;\npub mod service;\n",
    )
    .unwrap();
    fs::write(src.join("a.rs"), "use crate::b::Thing; // crate::c\n").unwrap();
    fs::write(src.join("b.rs"), "pub fn f() { crate::a::g() }\n").unwrap();
    fs::write(src.join("service/mod.rs"), "pub mod x;\nuse x::Y;\n").unwrap();
    // A child using its parent is not a cycle; a test module's imports do not count.
    fs::write(
        src.join("service/x.rs"),
        "use super::Shared;\n#[cfg(test)]\nmod tests { use crate::a::g; }\n",
    )
    .unwrap();
    let graph = import_graph(&src);
    let found = cycles(&graph);
    fs::remove_dir_all(&dir).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    let mut files: Vec<String> = found[0].iter().map(show).collect();
    files.sort();
    assert_eq!(files, ["a", "b"]);
    assert!(graph[&vec!["service".to_string(), "x".to_string()]].is_empty());
}
