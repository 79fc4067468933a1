//! The layering ARCHITECTURE.md promises, checked from the code itself:
//! - crate dependencies (`cargo metadata`): each tsr crate depends only on the tsr crates below
//!   it; sled only in tsr-state; candle and gemm only in tsr-model and tsr-dpo; tsr-engine's
//!   whole dependency tree, dev-dependencies included, free of candle;
//! - no import cycle between the modules of any crate: a module's `crate::`, `super::` and
//!   re-exported names resolve to sibling modules, and that graph has no cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn metadata() -> serde_json::Value {
    // Resolved for this machine's target only: the others' packages need not be downloaded.
    let rustc =
        std::process::Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
            .arg("-vV")
            .output()
            .unwrap();
    let host = String::from_utf8(rustc.stdout)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .expect("rustc -vV names the host");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let o = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--filter-platform",
            &host,
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Each workspace crate's direct dependencies by name, with their kind (`normal`, `dev`, `build`).
fn direct_deps(meta: &serde_json::Value) -> BTreeMap<String, Vec<(String, String)>> {
    let members: BTreeSet<&str> = meta["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    let mut out = BTreeMap::new();
    for p in meta["packages"].as_array().unwrap() {
        if !members.contains(p["id"].as_str().unwrap()) {
            continue;
        }
        let deps = p["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["name"].as_str().unwrap().to_string(),
                    d["kind"].as_str().unwrap_or("normal").to_string(),
                )
            })
            .collect();
        out.insert(p["name"].as_str().unwrap().to_string(), deps);
    }
    out
}

#[test]
fn each_crate_depends_only_on_the_layers_below_it() {
    let deps = direct_deps(&metadata());
    // The tsr crates each may use (any kind of dependency).
    let allowed: BTreeMap<&str, &[&str]> = BTreeMap::from([
        ("tsr-base", &[][..]),
        ("tsr-state", &["tsr-base"][..]),
        ("tsr-engine", &["tsr-state"][..]),
        ("tsr-model", &["tsr-base"][..]),
        ("tsr-dpo", &["tsr-base", "tsr-model"][..]),
        (
            "tsr-steps",
            &["tsr-state", "tsr-engine", "tsr-model", "tsr-dpo"][..],
        ),
        (
            "tsr-workflows",
            &[
                "tsr-state",
                "tsr-engine",
                "tsr-steps",
                "tsr-model",
                "tsr-dpo",
            ][..],
        ),
        (
            "tsr",
            &[
                "tsr-state",
                "tsr-engine",
                "tsr-steps",
                "tsr-model",
                "tsr-dpo",
                "tsr-workflows",
            ][..],
        ),
    ]);
    assert_eq!(
        deps.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        allowed.keys().copied().collect(),
        "the workspace's crates changed: give each new one its place here and in ARCHITECTURE.md"
    );
    let only_in = |dep: &str, crates: &[&str]| {
        for (krate, ds) in &deps {
            if ds.iter().any(|(d, _)| d == dep) {
                assert!(
                    crates.contains(&krate.as_str()),
                    "{krate} depends on {dep}, which only {crates:?} may"
                );
            }
        }
    };
    only_in("sled", &["tsr-state"]);
    for candle in ["candle-core", "candle-nn", "candle-transformers", "gemm"] {
        only_in(candle, &["tsr-model", "tsr-dpo"]);
    }
    for (krate, ds) in &deps {
        for (d, _) in ds.iter().filter(|(d, _)| d.starts_with("tsr")) {
            assert!(
                allowed[krate.as_str()].contains(&d.as_str()),
                "{krate} depends on {d}: the crate graph is tsr -> tsr-workflows -> tsr-steps -> tsr-engine -> tsr-state, and tsr-steps -> tsr-dpo -> tsr-model"
            );
        }
    }
    // The model layer keeps gemm's AVX-512 kernels: without the feature they silently drop.
    let meta = metadata();
    let model = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "tsr-model")
        .unwrap();
    let gemm = model["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "gemm")
        .expect("tsr-model depends on gemm");
    assert!(
        gemm["features"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "x86-v4"),
        "{gemm}"
    );
}

#[test]
fn the_engine_and_everything_it_compiles_are_free_of_candle() {
    let meta = metadata();
    let nodes: BTreeMap<&str, &serde_json::Value> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();
    let name_of: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let id_of = |name: &str| *name_of.iter().find(|(_, n)| **n == name).unwrap().0;
    // The engine's dependencies of every kind, then theirs (normal and build only).
    let mut todo: Vec<(&str, bool)> = vec![(id_of("tsr-engine"), true)];
    let mut seen = BTreeSet::new();
    while let Some((id, top)) = todo.pop() {
        if !seen.insert(id) {
            continue;
        }
        for d in nodes[id]["deps"].as_array().unwrap() {
            let kinds = d["dep_kinds"].as_array().unwrap();
            if top || kinds.iter().any(|k| k["kind"] != "dev") {
                todo.push((d["pkg"].as_str().unwrap(), false));
            }
        }
    }
    let names: BTreeSet<&str> = seen.iter().map(|id| name_of[id]).collect();
    for bad in [
        "candle-core",
        "candle-nn",
        "gemm",
        "tsr-model",
        "tsr-dpo",
        "tsr-steps",
    ] {
        assert!(!names.contains(bad), "tsr-engine compiles {bad}");
    }
    assert!(
        names.contains("tsr-state") && names.contains("petgraph"),
        "{names:?}"
    );
}

/// The modules of one crate's `src/` (files and folders directly in it), and for each the
/// sibling modules it refers to.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut modules: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let root_files = ["lib.rs", "main.rs", "mod.rs"];
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if p.is_dir() {
            modules.insert(name, rust_files(&p));
        } else if name.ends_with(".rs") && !root_files.contains(&name.as_str()) {
            modules.insert(name.trim_end_matches(".rs").to_string(), vec![p]);
        }
    }
    // Names the root file re-exports: `pub use m::{A, B}` / `pub(crate) use m::A`.
    let mut reexport: BTreeMap<String, String> = BTreeMap::new();
    for f in root_files {
        let Ok(text) = std::fs::read_to_string(src.join(f)) else {
            continue;
        };
        for stmt in text.split(';') {
            let s = stmt.trim();
            let Some(rest) = s
                .strip_prefix("pub use ")
                .or_else(|| s.strip_prefix("pub(crate) use "))
                .or_else(|| s.strip_prefix("use "))
            else {
                continue;
            };
            let Some((m, names)) = rest.split_once("::") else {
                continue;
            };
            if !modules.contains_key(m) {
                continue;
            }
            for n in names.trim_matches(|c| c == '{' || c == '}').split(',') {
                let n = n.split(" as ").last().unwrap().trim();
                if !n.is_empty() {
                    reexport.insert(n.to_string(), m.to_string());
                }
            }
        }
    }
    let mut graph = BTreeMap::new();
    for (m, files) in &modules {
        let mut to = BTreeSet::new();
        for f in files {
            let text = std::fs::read_to_string(f).unwrap();
            // Test modules may use anything; comments (doc links) are not imports.
            let text = text.split("#[cfg(test)]").next().unwrap();
            let text: String = text
                .lines()
                .map(|l| l.split("//").next().unwrap())
                .collect::<Vec<_>>()
                .join("\n");
            let text = text.as_str();
            // From a file directly in src/, `super::` is the crate root.
            let prefixes: &[&str] = if f.parent() == Some(src) {
                &["crate::", "super::"]
            } else {
                &["crate::"]
            };
            for prefix in prefixes {
                for (i, _) in text.match_indices(prefix) {
                    if i > 0 && text[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
                        continue;
                    }
                    let rest = &text[i + prefix.len()..];
                    let mut names = vec![];
                    if let Some(inner) = rest.strip_prefix('{') {
                        let end = inner.find('}').unwrap_or(inner.len());
                        names.extend(
                            inner[..end]
                                .split(',')
                                .map(|s| s.trim().split("::").next().unwrap().to_string()),
                        );
                    } else {
                        names.push(
                            rest.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                                .next()
                                .unwrap()
                                .to_string(),
                        );
                    }
                    for n in names {
                        let target = if modules.contains_key(&n) {
                            Some(n.clone())
                        } else {
                            reexport.get(&n).cloned()
                        };
                        if let Some(t) = target {
                            if &t != m {
                                to.insert(t);
                            }
                        }
                    }
                }
            }
        }
        graph.insert(m.clone(), to);
    }
    graph
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// A cycle of `graph`, if it has one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(n) {
            Some(2) => return None,
            Some(1) => {
                let at = path.iter().position(|p| p == n).unwrap();
                let mut c = path[at..].to_vec();
                c.push(n.to_string());
                return Some(c);
            }
            _ => {}
        }
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if let Some(c) = visit(n, graph, &mut state, &mut vec![]) {
            return Some(c);
        }
    }
    None
}

/// Every `src/` folder of the workspace and the module folders inside them.
fn source_folders() -> Vec<PathBuf> {
    let mut out = vec![];
    for krate in [
        "base",
        "state",
        "engine",
        "model",
        "dpo",
        "steps",
        "workflows",
        ".",
    ] {
        let src = root().join(krate).join("src");
        let mut stack = vec![src];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                }
            }
            out.push(d);
        }
    }
    out.sort();
    out
}

#[test]
fn no_module_imports_form_a_cycle() {
    let mut cycles = vec![];
    for src in source_folders() {
        if let Some(c) = find_cycle(&module_graph(&src)) {
            cycles.push(format!(
                "{}: {}",
                src.strip_prefix(root()).unwrap().display(),
                c.join(" -> ")
            ));
        }
    }
    assert!(
        cycles.is_empty(),
        "import cycles between modules:\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_cycle_check_finds_a_planted_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::write(
        src.join("lib.rs"),
        "mod a;\nmod b;\nmod c;\npub use c::Thing;\n",
    )
    .unwrap();
    std::fs::write(src.join("a.rs"), "use crate::b::f;\n").unwrap();
    std::fs::write(src.join("b.rs"), "pub fn f() { super::Thing::new(); }\n").unwrap();
    std::fs::write(
        src.join("c.rs"),
        "use crate::{a, b::f};\n#[cfg(test)]\nmod tests { use crate::a; }\n",
    )
    .unwrap();
    let g = module_graph(src);
    assert_eq!(g["b"], BTreeSet::from(["c".to_string()]));
    assert_eq!(find_cycle(&g).unwrap().len(), 4, "{g:?}");
    std::fs::write(
        src.join("c.rs"),
        "#[cfg(test)]\nmod tests { use crate::a; }\n",
    )
    .unwrap();
    assert_eq!(find_cycle(&module_graph(src)), None);
}
