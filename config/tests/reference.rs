//! `docs/configuration.md` is generated from the configuration structs: their doc comments,
//! serde names and the embedded defaults. This test renders it and fails when the committed
//! file differs; `UPDATE_CONFIG_REFERENCE=1 cargo test -p tailgate-config --test reference`
//! rewrites it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;

use syn::{Attribute, Fields, Item, Type};

/// A struct or enum of the configuration, as the sources declare it.
enum Decl {
    Struct { doc: String, fields: Vec<Field>, all_default: bool },
    Enum { doc: String, variants: Vec<(String, String)> },
}

struct Field {
    key: String,
    doc: String,
    ty: Type,
    flatten: bool,
    /// `#[serde(default)]` on the field.
    default: bool,
}

fn doc_of(attrs: &[Attribute]) -> String {
    let mut lines = Vec::new();
    for attr in attrs.iter().filter(|a| a.path().is_ident("doc")) {
        if let syn::Meta::NameValue(nv) = &attr.meta
            && let syn::Expr::Lit(syn::ExprLit { lit: syn::Lit::Str(text), .. }) = &nv.value
        {
            lines.push(text.value().trim().to_owned());
        }
    }
    // Paragraphs become one line each; intra-doc links lose their brackets.
    let mut out = lines.join("\n").split("\n\n").map(|p| p.replace('\n', " ")).collect::<Vec<_>>().join(" ");
    for (from, to) in [("[`", "`"), ("`]", "`")] {
        out = out.replace(from, to);
    }
    out.replace('|', "\\|")
}

/// `rename`, `rename_all`, `flatten` and `default` from `#[serde(...)]`.
fn serde_attrs(attrs: &[Attribute]) -> (Option<String>, Option<String>, bool, bool) {
    let (mut rename, mut rename_all, mut flatten, mut default) = (None, None, false, false);
    for attr in attrs.iter().filter(|a| a.path().is_ident("serde")) {
        let _ = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("rename") {
                rename = Some(meta.value()?.parse::<syn::LitStr>()?.value());
            } else if meta.path.is_ident("rename_all") {
                rename_all = Some(meta.value()?.parse::<syn::LitStr>()?.value());
            } else if meta.path.is_ident("flatten") {
                flatten = true;
            } else if meta.path.is_ident("default") {
                default = true;
                if meta.input.peek(syn::Token![=]) {
                    let _ = meta.value()?.parse::<syn::Expr>()?;
                }
            } else if meta.input.peek(syn::Token![=]) {
                let _ = meta.value()?.parse::<syn::Expr>()?;
            } else if meta.input.peek(syn::token::Paren) {
                meta.parse_nested_meta(|inner| {
                    if inner.input.peek(syn::Token![=]) {
                        let _ = inner.value()?.parse::<syn::Expr>()?;
                    }
                    Ok(())
                })?;
            }
            Ok(())
        });
    }
    (rename, rename_all, flatten, default)
}

fn snake_case(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

fn declarations() -> BTreeMap<String, Decl> {
    let mut decls = BTreeMap::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files: Vec<_> = std::fs::read_dir(&src).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for path in files.iter().filter(|p| p.extension().is_some_and(|e| e == "rs")) {
        let file = syn::parse_file(&std::fs::read_to_string(path).unwrap()).unwrap();
        for item in file.items {
            match item {
                Item::Struct(s) => {
                    let Fields::Named(named) = s.fields else { continue };
                    let fields = named
                        .named
                        .iter()
                        .map(|f| {
                            let (rename, _, flatten, default) = serde_attrs(&f.attrs);
                            let name = f.ident.as_ref().unwrap().to_string();
                            let (key, doc, ty) = (rename.unwrap_or(name), doc_of(&f.attrs), f.ty.clone());
                            Field { key, doc, ty, flatten, default }
                        })
                        .collect();
                    let all_default = serde_attrs(&s.attrs).3;
                    decls.insert(s.ident.to_string(), Decl::Struct { doc: doc_of(&s.attrs), fields, all_default });
                }
                Item::Enum(e) => {
                    let (_, rename_all, _, _) = serde_attrs(&e.attrs);
                    let variants = e
                        .variants
                        .iter()
                        .map(|v| {
                            let (rename, _, _, _) = serde_attrs(&v.attrs);
                            let name = rename.unwrap_or_else(|| match rename_all.as_deref() {
                                Some("snake_case") => snake_case(&v.ident.to_string()),
                                Some("lowercase") => v.ident.to_string().to_lowercase(),
                                _ => v.ident.to_string(),
                            });
                            (name, doc_of(&v.attrs))
                        })
                        .collect();
                    decls.insert(e.ident.to_string(), Decl::Enum { doc: doc_of(&e.attrs), variants });
                }
                _ => {}
            }
        }
    }
    decls
}

/// The type as written, and the configuration type inside it with how the key path continues
/// into it (`""` for a plain or optional field, `[]` for a list, `.<name>` for a map).
fn shape(ty: &Type) -> (String, Option<(String, &'static str)>) {
    let text = quote_type(ty);
    let Type::Path(path) = ty else { return (text, None) };
    let last = path.path.segments.last().unwrap();
    let inner = |index: usize| match &last.arguments {
        syn::PathArguments::AngleBracketed(args) => args
            .args
            .iter()
            .filter_map(|a| if let syn::GenericArgument::Type(t) = a { Some(t) } else { None })
            .nth(index),
        _ => None,
    };
    let name = last.ident.to_string();
    let nested = match name.as_str() {
        "Option" | "Box" => inner(0).and_then(|t| shape(t).1),
        "Vec" => inner(0).and_then(|t| shape(t).1).map(|(n, _)| (n, "[]")),
        "BTreeMap" | "HashMap" => inner(1).and_then(|t| shape(t).1).map(|(n, _)| (n, ".<name>")),
        _ => Some((name, "")),
    };
    (text, nested)
}

fn quote_type(ty: &Type) -> String {
    use quote::ToTokens;
    ty.to_token_stream()
        .to_string()
        .replace(" < ", "<")
        .replace(" >", ">")
        .replace(" , ", ", ")
        .replace("< ", "<")
        .replace("crate :: ", "")
}

/// The default at `path` in the embedded configuration, as compact JSON (lists and maps of up
/// to 60 characters; longer ones are left to the example file).
fn default_at(defaults: &serde_json::Value, path: &str) -> String {
    let mut value = defaults;
    for part in path.split('.') {
        match value.get(part) {
            Some(v) => value = v,
            None => return String::new(),
        }
    }
    let text = match value {
        serde_json::Value::Null => return String::new(),
        serde_json::Value::String(s) => format!("`{s}`"),
        serde_json::Value::Object(_) => return String::new(),
        other => format!("`{other}`"),
    };
    if text.len() > 64 { String::from("(see the example file)") } else { text.replace('|', "\\|") }
}

struct Renderer<'a> {
    decls: &'a BTreeMap<String, Decl>,
    defaults: serde_json::Value,
    out: String,
    enums: BTreeMap<String, ()>,
}

impl Renderer<'_> {
    fn section(&mut self, path: &str, type_name: &str, stack: &mut Vec<String>) {
        let Some(Decl::Struct { doc, fields, all_default }) = self.decls.get(type_name) else { return };
        let title = if path.is_empty() { "Top level".to_owned() } else { format!("`{path}`") };
        let _ =
            writeln!(self.out, "\n## {title}\n\n{doc}\n\n| key | type | default | description |\n|---|---|---|---|");
        let mut nested = Vec::new();
        for field in fields {
            let (text, inner) = shape(&field.ty);
            let key = if path.is_empty() { field.key.clone() } else { format!("{path}.{}", field.key) };
            let key = if field.flatten { path.to_owned() } else { key };
            let mut description = field.doc.clone();
            if let Some((name, _)) = &inner
                && let Some(Decl::Enum { variants, .. }) = self.decls.get(name)
                && variants.iter().all(|(_, doc)| !doc.is_empty() || variants.len() > 1)
            {
                let names: Vec<String> = variants.iter().map(|(n, _)| format!("`{n}`")).collect();
                let _ = write!(description, " One of {}.", names.join(", "));
                self.enums.insert(name.clone(), ());
            }
            let default_path = key.trim_start_matches('.');
            let optional = text.starts_with("Option<");
            let default = if !optional && !field.default && !all_default && !field.flatten {
                "required".to_owned()
            } else if default_path.contains('<') || default_path.contains("[]") {
                String::new()
            } else {
                default_at(&self.defaults, default_path)
            };
            let _ = writeln!(self.out, "| `{key}` | `{text}` | {default} | {description} |");
            if let Some((name, suffix)) = inner
                && matches!(self.decls.get(&name), Some(Decl::Struct { .. }))
                && !stack.contains(&name)
            {
                nested.push((format!("{key}{suffix}"), name));
            }
        }
        for (key, name) in nested {
            stack.push(name.clone());
            self.section(&key, &name, stack);
            stack.pop();
        }
    }

    fn enums(&mut self) {
        let names: Vec<String> = self.enums.keys().cloned().collect();
        if names.is_empty() {
            return;
        }
        let _ = writeln!(self.out, "\n## Values\n");
        for name in names {
            let Some(Decl::Enum { doc, variants }) = self.decls.get(&name) else { continue };
            let _ = writeln!(self.out, "### `{name}`\n\n{doc}\n");
            for (value, doc) in variants {
                let _ = writeln!(self.out, "- `{value}`{}{doc}", if doc.is_empty() { "" } else { ": " });
            }
            self.out.push('\n');
        }
    }
}

/// The embedded defaults, with the optional sections present (built from their required keys
/// only, so their other keys show their defaults).
fn defaults() -> serde_json::Value {
    use tailgate_config::{FilelogReceiver, LokiExporter, RemoteWriteExporter};
    let mut defaults = serde_json::to_value(tailgate_config::Config::embedded_default().unwrap()).unwrap();
    let filelog: FilelogReceiver = serde_json::from_value(serde_json::json!({ "include": ["x"] })).unwrap();
    let loki: LokiExporter = serde_json::from_value(serde_json::json!({ "endpoint": "http://x" })).unwrap();
    let remote_write: RemoteWriteExporter =
        serde_json::from_value(serde_json::json!({ "endpoint": "http://x" })).unwrap();
    defaults["receivers"]["filelog"] = serde_json::to_value(filelog).unwrap();
    defaults["exporters"]["logs"]["loki"] = serde_json::to_value(loki).unwrap();
    defaults["exporters"]["metrics"]["prometheusremotewrite"] = serde_json::to_value(remote_write).unwrap();
    defaults
}

fn render() -> String {
    let decls = declarations();
    let defaults = defaults();
    let mut renderer = Renderer { decls: &decls, defaults, out: String::new(), enums: BTreeMap::new() };
    renderer.out.push_str(
        "# Configuration reference\n\n\
         Generated from the doc comments of the configuration structs (`config/src/*.rs`) by\n\
         `config/tests/reference.rs`, which fails when this file is stale\n\
         (`UPDATE_CONFIG_REFERENCE=1 cargo test -p tailgate-config --test reference` rewrites it).\n\
         Defaults are those of the embedded configuration, `config/tailgate.example.yaml`, an\n\
         annotated file of every default; `docs/edge-node.yaml` is an annotated configuration for an\n\
         edge node. `tailgate check-config FILE` validates a file and names every problem with its\n\
         key path. Any value may be `${env:NAME}` or `${env:NAME:-default}`.\n",
    );
    let mut stack = vec!["Config".to_owned()];
    renderer.section("", "Config", &mut stack);
    renderer.enums();
    // Every struct of the configuration is reachable from `Config` (a new one is documented).
    let mut reached: HashSet<&str> = HashSet::new();
    for line in renderer.out.lines().filter(|l| l.starts_with("## ")) {
        reached.insert(line);
    }
    assert!(reached.len() > 20, "{} sections", reached.len());
    renderer.out
}

#[test]
fn the_configuration_reference_is_current() {
    let rendered = render();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
    if std::env::var_os("UPDATE_CONFIG_REFERENCE").is_some() {
        std::fs::write(&path, &rendered).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == rendered,
        "docs/configuration.md is stale: run `UPDATE_CONFIG_REFERENCE=1 cargo test -p tailgate-config --test reference`"
    );
}
