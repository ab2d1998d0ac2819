//! The rule of which part of `src/` may use which, read from the sources.
//!
//! Every top-level module sits on a layer (the table below, also drawn in
//! README's Layout); a module may use modules on its own layer or below,
//! never above, and the modules form no import circle. The engine
//! (`ledger`) knows no feature, and the HTTP edge holds no database handle.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may use its own layer and those below.
const LAYERS: &[(&str, &[&str])] = &[
    ("plain data", &["money", "text", "clock", "config"]),
    (
        "shared parts",
        &["pricing", "telemetry", "db", "signatures"],
    ),
    ("engine", &["ledger"]),
    ("outside services", &["providers", "stripe", "clerk"]),
    (
        "features",
        &[
            "accounts",
            "api_keys",
            "payments",
            "referrals",
            "recharge",
            "events",
            "email",
            "operators",
            "webhooks",
            "metering",
            "rate_limits",
            "health",
        ],
    ),
    ("composition", &["runtime", "http", "demo", "app"]),
];

/// Modules the engine must not name, whatever their layer.
const ABOVE_THE_ENGINE: &[&str] = &[
    "http",
    "metering",
    "stripe",
    "recharge",
    "accounts",
    "clerk",
    "events",
    "email",
    "referrals",
    "runtime",
];

/// Words that would give the HTTP edge a database handle.
const DATABASE_HANDLES: &[&str] = &["tokio_postgres", "deadpool", "state.pool", ".client()"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|error| panic!("cannot list {}: {error}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            found.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`None` for the crate root and `main.rs`).
fn top_module(path: &Path) -> Option<String> {
    let relative = path.strip_prefix(src()).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_string())
}

/// The source without comments, string and char literals, so words in
/// docs and messages are not read as code.
fn code_only(source: &str) -> String {
    let bytes = source.as_bytes();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &source[i..];
        if rest.starts_with("//") {
            i += rest.find('\n').unwrap_or(rest.len());
        } else if rest.starts_with("/*") {
            i += rest.find("*/").map_or(rest.len(), |end| end + 2);
        } else if rest.starts_with("r#\"") || rest.starts_with("r\"") {
            let hashes = rest[1..].chars().take_while(|&c| c == '#').count();
            let close = format!("\"{}", "#".repeat(hashes));
            let open = 2 + hashes;
            i += rest[open..]
                .find(&close)
                .map_or(rest.len(), |end| open + end + close.len());
            out.push_str("\"\"");
        } else if bytes[i] == b'"' {
            let mut j = i + 1;
            while j < bytes.len() && bytes[j] != b'"' {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            i = j + 1;
            out.push_str("\"\"");
        } else if bytes[i] == b'\'' && is_char_literal(rest) {
            let end = rest[1..].find('\'').map_or(rest.len(), |end| end + 2);
            i += end;
            out.push_str("' '");
        } else {
            let c = rest.chars().next().expect("not at the end");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// Whether `'` starts a char literal rather than a lifetime.
fn is_char_literal(rest: &str) -> bool {
    let mut chars = rest.chars().skip(1);
    matches!(
        (chars.next(), chars.next()),
        (Some('\\'), _) | (Some(_), Some('\''))
    )
}

/// The top-level modules a file names through `crate::`, including inside
/// `use crate::{a::X, b}` groups.
fn crate_uses(code: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item = String::new();
            let mut first_of_item = true;
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 1 => first_of_item = true,
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
                if first_of_item {
                    if c.is_alphanumeric() || c == '_' {
                        item.push(c);
                    } else if !item.is_empty() {
                        used.insert(std::mem::take(&mut item));
                        first_of_item = false;
                    }
                }
            }
            if !item.is_empty() {
                used.insert(item);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                used.insert(name);
            }
        }
    }
    used
}

struct Sources {
    /// (file, its top-level module, its code without comments and strings)
    files: Vec<(PathBuf, Option<String>, String)>,
}

fn sources() -> Sources {
    let mut paths = Vec::new();
    rust_files(&src(), &mut paths);
    let files = paths
        .into_iter()
        .map(|path| {
            let source = fs::read_to_string(&path)
                .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
            let module = top_module(&path);
            (path, module, code_only(&source))
        })
        .collect();
    Sources { files }
}

/// Top-level module → the other top-level modules it uses, and the file
/// that names each (for the message).
fn module_graph(sources: &Sources) -> BTreeMap<String, BTreeMap<String, PathBuf>> {
    let mut graph: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
    for (path, module, code) in &sources.files {
        let Some(module) = module else { continue };
        let edges = graph.entry(module.clone()).or_default();
        for used in crate_uses(code) {
            if &used != module {
                edges.entry(used).or_insert_with(|| path.clone());
            }
        }
    }
    graph
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, modules)| modules.contains(&module))
}

fn shown(path: &Path) -> String {
    path.strip_prefix(src())
        .map(|relative| format!("src/{}", relative.display()))
        .unwrap_or_else(|_| path.display().to_string())
}

#[test]
fn every_module_of_src_has_a_layer() {
    let graph = module_graph(&sources());
    let unplaced: Vec<_> = graph.keys().filter(|m| layer_of(m).is_none()).collect();
    assert!(
        unplaced.is_empty(),
        "modules missing from LAYERS: {unplaced:?}"
    );
}

#[test]
fn no_module_uses_a_module_on_a_layer_above_it() {
    let graph = module_graph(&sources());
    let mut wrong = Vec::new();
    for (module, edges) in &graph {
        let Some(own) = layer_of(module) else {
            continue;
        };
        for (used, file) in edges {
            if let Some(theirs) = layer_of(used) {
                if theirs > own {
                    wrong.push(format!(
                        "{} ({}) uses {used} ({})",
                        shown(file),
                        LAYERS[own].0,
                        LAYERS[theirs].0
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "uses of a higher layer:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_top_level_modules_form_no_import_circle() {
    let graph = module_graph(&sources());
    // Depth-first search; a grey node met again closes a circle.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeMap<String, PathBuf>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        circles: &mut Vec<String>,
    ) {
        if done.contains(node) {
            return;
        }
        if let Some(start) = path.iter().position(|seen| seen == node) {
            let mut circle = path[start..].to_vec();
            circle.push(node.to_string());
            circles.push(circle.join(" → "));
            return;
        }
        path.push(node.to_string());
        if let Some(edges) = graph.get(node) {
            for used in edges.keys() {
                visit(used, graph, path, done, circles);
            }
        }
        path.pop();
        done.insert(node.to_string());
    }
    let mut circles = Vec::new();
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        visit(module, &graph, &mut Vec::new(), &mut done, &mut circles);
    }
    assert!(
        circles.is_empty(),
        "import circles:\n{}",
        circles.join("\n")
    );
}

#[test]
fn the_engine_names_no_feature_above_it() {
    let sources = sources();
    let mut wrong = Vec::new();
    for (path, module, code) in &sources.files {
        if module.as_deref() != Some("ledger") {
            continue;
        }
        for used in crate_uses(code) {
            if ABOVE_THE_ENGINE.contains(&used.as_str()) {
                wrong.push(format!("{} uses crate::{used}", shown(path)));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_http_edge_holds_no_database_handle() {
    let sources = sources();
    let mut wrong = Vec::new();
    for (path, module, code) in &sources.files {
        if module.as_deref() != Some("http") {
            continue;
        }
        for handle in DATABASE_HANDLES {
            if code.contains(handle) {
                wrong.push(format!("{} names {handle}", shown(path)));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_reader_sees_uses_inside_groups_and_ignores_comments_and_strings() {
    let code = code_only(
        "use crate::{ledger::{A, B}, money};\n// crate::http\nlet s = \"crate::stripe\";\nfn f<'a>(c: char) { let q = 'x'; crate::db::client(); }",
    );
    let used: Vec<_> = crate_uses(&code).into_iter().collect();
    assert_eq!(used, ["db", "ledger", "money"]);
}

/// The files of `src/http/` every route file may use; a route file never
/// uses another (`openapi.rs` lists the routes, `mod.rs` mounts them).
const HTTP_SHARED: &[&str] = &["error", "views", "state", "body", "auth", "extract"];

#[test]
fn no_route_file_uses_another() {
    let sources = sources();
    let mut wrong = Vec::new();
    for (path, module, code) in &sources.files {
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if module.as_deref() != Some("http") || ["mod", "openapi"].contains(&name) {
            continue;
        }
        for used in super_uses(code) {
            if used != name && !HTTP_SHARED.contains(&used.as_str()) {
                wrong.push(format!("{} uses super::{used}", shown(path)));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The sibling modules a file names through `super::`.
fn super_uses(code: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("super::") {
        rest = &rest[at + "super::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // `super::Item` names the parent's own item (a type), not a file.
        if name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
            used.insert(name);
        }
    }
    used
}
